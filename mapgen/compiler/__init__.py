"""The compiler: a family spec and a model config in, a flat generated Python module out.

spec.py / config.py read the inputs (with pattern.py, expr.py, yamlsource.py); inventory.py
lists both models' tensors (transformers' and megatron-core's own skeletons, which the model
classes of model_classes.py build);
kinds.py defines each mapping kind once; expand.py matches every Megatron parameter to one rule
and decides it (the IR, ir.py); render.py and the template write the module, postprocess.py and
format.py check and format it, write.py puts it on disk; diff.py summarises two builds (diffread.py reads
them, diffmatch.py pairs and groups their parameters).
(`mapgen explain` lives beside the CLI, in mapgen/explain.py: it reads a built module and the
runtime's shard map.) Of mapgen's own code it imports only `mapgen.common` (torch-free): never
the runtime, never verification. (It uses torch through megatron-core, for the skeletons.)"""
