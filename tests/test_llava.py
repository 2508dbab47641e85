"""LLaVA-1.5 (LlavaForConditionalGeneration) to megatron-core's LLaVAModel (issue 11, item 2).

Independent truths: transformers' own config defaults and its forward pass (vision features,
projector output, logits for two images and two prompts), megatron-core's own LLaVAModel built
whole, the Megatron row formula of a vision `linear_qkv` written out here, and the bytes of
the saved safetensors files. The distributed checks share one spawn of 2 gloo processes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mapgen.common.dims import ModelDims
from mapgen.compiler.build import compile_target
from mapgen.compiler.targets import read_targets
from mapgen.compiler.config import translate
from mapgen.compiler.hfconfig import read_hf_config
from mapgen.compiler.spec import parse_spec
from mapgen.runtime import Group, ParallelContext
from mapgen.verify import testing
from mapgen.verify.llava import load_reference
from mapgen.verify.llava_standin import TOWER_PUBLISHED, save_llava_standin

SPEC = testing.ROOT / "specs/llava.yaml"
PUBLISHED = testing.ROOT / "specs/configs/llava_1_5_7b.json"


def _dims(fields: dict[str, Any]) -> ModelDims:
    return translate(parse_spec(str(SPEC), SPEC.read_text()), read_hf_config("config.json", json.dumps(fields, indent=2)))


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stand-in checkpoint (published names) and its local-layout module."""
    folder = tmp_path_factory.mktemp("llava_hf")
    model = save_llava_standin(folder, seed=3)
    out = tmp_path_factory.mktemp("llava_generated")
    name = "llava_standin_local"
    path = out / f"{name}.py"
    path.write_text(compile_target(name, SPEC, folder / "config.json", "local", "test"))  # LLaVAModel: the spec's
    module = testing.import_module_from_path(path, f"gen_{name}")
    return {"folder": folder, "model": model, "path": path, "module": module}


def test_the_target_is_checked_in_as_a_llava_model() -> None:
    (entry,) = [e for e in read_targets(testing.ROOT) if e.name == "llava_1_5_7b"]
    assert (entry.spec, entry.config, entry.layout, entry.model) == (
        "specs/llava.yaml", "specs/configs/llava_1_5_7b.json", "te", "llava"
    )


@pytest.mark.parametrize("which", ["published", "text defaults"])
def test_spec_dims_are_what_transformers_builds(which: str) -> None:
    """The published config leaves most sizes to transformers' defaults; the spec's defaults
    must be transformers' (LlamaConfig's and CLIPVisionConfig's)."""
    import transformers

    fields = json.loads(PUBLISHED.read_text())
    if which == "text defaults":
        fields = {k: v for k, v in fields.items() if k not in ("text_config", "vocab_size")}
        fields["vision_config"] = {k: fields["vision_config"][k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"
        )}
    dims = _dims(fields)
    config = transformers.LlavaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    text, vision = config.text_config, config.vision_config
    layers_read = vision.num_hidden_layers + 1 + config.vision_feature_layer  # hidden_states[-2]
    expected = dict(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads, num_query_groups=text.num_key_value_heads,
        kv_channels=text.head_dim, vocab_size=text.vocab_size, max_position_embeddings=text.max_position_embeddings,
        layernorm_epsilon=text.rms_norm_eps, activation=text.hidden_act, rotary_base=text.rope_parameters["rope_theta"],
        rope_type=text.rope_parameters["rope_type"], share_embeddings_and_output_weights=config.tie_word_embeddings,
        vision_num_layers=layers_read, vision_hidden_size=vision.hidden_size,
        vision_ffn_hidden_size=vision.intermediate_size, vision_num_attention_heads=vision.num_attention_heads,
        vision_kv_channels=vision.hidden_size // vision.num_attention_heads, vision_layernorm_epsilon=vision.layer_norm_eps,
        vision_activation=vision.hidden_act, vision_image_size=vision.image_size, vision_patch_size=vision.patch_size,
        vision_num_channels=vision.num_channels, projector_activation=config.projector_hidden_act,
        image_token_index=config.image_token_id,
        drop_vision_class_token=config.vision_feature_select_strategy == "default",
    )
    assert {k: getattr(dims, k) for k in expected} == expected
    if which == "published":
        assert (dims.num_layers, dims.hidden_size, dims.vocab_size, dims.vision_num_layers) == (32, 4096, 32064, 23)


def test_vision_sizes_are_required() -> None:
    """Without vision_config LlavaConfig builds ViT-L/14-336, with one lacking a size
    CLIPVisionConfig's ViT-B/32 size: the spec guesses neither."""
    from mapgen.common.errors import SpecError

    fields = json.loads(PUBLISHED.read_text())
    del fields["vision_config"]["hidden_size"]
    with pytest.raises(SpecError) as raised:
        _dims(fields)
    assert any("lacks field 'vision_config.hidden_size'" in m for m in raised.value.messages), raised.value.messages


def test_unverified_llava_variants_are_refused_at_their_field() -> None:
    fields = json.loads(PUBLISHED.read_text())
    for field, value, says in (
        ("vision_feature_layer", -3, "config field 'vision_feature_layer' is -3, but spec"),
        ("vision_feature_select_strategy", "full", "config field 'vision_feature_select_strategy' is \"full\""),
    ):
        from mapgen.common.errors import SpecError

        with pytest.raises(SpecError) as raised:
            _dims({**fields, field: value})
        assert any(says in m for m in raised.value.messages), raised.value.messages


def test_inventory_equals_a_full_llava_model_build() -> None:
    """One vision and one language layer expanded = megatron-core's LLaVAModel built whole:
    names in order, shapes, TP partitions."""
    from mapgen.compiler.llava_model import build_llava_model, llava_inventory
    from mapgen.compiler.parallel_state import single_process_parallel_state

    dims = _dims(testing.standin_config(json.loads(PUBLISHED.read_text())))
    assert (dims.num_layers, dims.vision_num_layers) == (2, 2)
    inventory = llava_inventory(dims, "local")
    with single_process_parallel_state(), torch.device("meta"):
        model = build_llava_model(dims)
    built = [
        (n, tuple(p.shape), int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None)
        for n, p in model.named_parameters()
    ]
    assert [(p.name, p.shape, p.partition_dim) for p in inventory] == built
    te = {p.name: p.te_name for p in inventory}
    assert te["vision_model.decoder.layers.1.input_layernorm.bias"] == "vision_model.decoder.layers.1.self_attention.linear_qkv.layer_norm_bias"
    assert te["vision_model.decoder.layers.0.pre_mlp_layernorm.weight"] == "vision_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert [p.layer for p in inventory if p.name.startswith("language_model.decoder.layers.1.")] == [1] * 6
    assert {p.layer for p in inventory if not p.name.startswith("language_model.decoder.")} == {None}


def test_published_checkpoint_names_load_in_transformers(standin: dict[str, Any]) -> None:
    """The stand-in carries the published names (vision_tower.vision_model.*), and transformers
    5 loads every one of its tensors from them."""
    from safetensors import safe_open

    with safe_open(str(standin["folder"] / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert f"{TOWER_PUBLISHED}embeddings.class_embedding" in names
    assert not [n for n in names if n.startswith("vision_tower.") and not n.startswith(TOWER_PUBLISHED)]
    reference = load_reference(standin["folder"], torch.float32).state_dict()
    for name, tensor in standin["model"].state_dict().items():
        assert torch.equal(reference[name], tensor), name


def test_module_maps_or_ignores_every_checkpoint_tensor(standin: dict[str, Any]) -> None:
    from safetensors import safe_open

    module: ModuleType = standin["module"]
    with safe_open(str(standin["folder"] / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    mapped = {t.name for t in module.HF_TENSORS}
    ignored = [n for n in names - mapped]
    assert sorted(ignored) == sorted(n for n in names if n.startswith(tuple(module.IGNORED_HF)))
    assert set(module.IGNORED_HF) == {f"{TOWER_PUBLISHED}encoder.layers.2.", f"{TOWER_PUBLISHED}post_layernorm."}
    assert len(ignored) == 18  # one CLIP layer (16 tensors) and the post-norm
    assert mapped <= names


@pytest.mark.parametrize("leaf", ["weight", "bias"])
@pytest.mark.parametrize("tp", [1, 2])
def test_vision_qkv_import_is_megatron_row_formula(standin: dict[str, Any], leaf: str, tp: int) -> None:
    """CLIP's q, k, v through the module's vision_qkv import: Megatron's linear_qkv holds, per
    head h, [q_h; k_h; v_h] (one query group per head); TP rank r the heads of its block."""
    module: ModuleType = standin["module"]
    name = f"vision_model.decoder.layers.1.self_attention.linear_qkv.{leaf}"
    heads, d = module.DIMS.vision_num_attention_heads, module.DIMS.vision_kv_channels
    hidden = module.DIMS.vision_hidden_size
    source = {
        role: torch.arange(heads * d, dtype=torch.float64)[:, None].repeat(1, hidden) + offset
        for role, offset in (("q", 0), ("k", 1000), ("v", 2000))
    }
    if leaf == "bias":
        source = {role: t[:, 0].contiguous() for role, t in source.items()}

    def load(hf_name: str) -> torch.Tensor:
        role = re.search(r"self_attn\.([qkv])_proj\.", hf_name)
        assert role is not None and hf_name.startswith(f"{TOWER_PUBLISHED}encoder.layers.1."), hf_name
        return source[role.group(1)]

    per_rank = heads // tp
    for rank in range(tp):
        shard = module.IMPORTS[name](ParallelContext(tp=Group(rank, tp)), load)
        expected = torch.empty_like(shard)
        for local in range(per_rank):
            h = rank * per_rank + local
            for slot, role in enumerate("qkv"):
                for t in range(d):
                    expected[(local * 3 + slot) * d + t] = source[role][h * d + t]
        assert torch.equal(shard, expected)
    parts = [module.IMPORTS[name](ParallelContext(tp=Group(r, tp)), load) for r in range(tp)]
    back = module.EXPORTS[name](parts)
    for role in "qkv":
        assert torch.equal(back[f"{TOWER_PUBLISHED}encoder.layers.1.self_attn.{role}_proj.{leaf}"], source[role])


def test_pipeline_parallelism_is_refused_before_any_process(standin: dict[str, Any]) -> None:
    from mapgen.common.parallel import ParallelLayout
    from mapgen.verify.jobs import preflight
    from mapgen.verify.verdict import Job

    found = preflight(Job(str(standin["path"]), str(standin["folder"]), ParallelLayout(pp=2)))
    assert found == [
        "layout tp1xpp2: --pp 2: llava_standin_local is a LLaVAModel, supported without pipeline "
        "parallelism only (megatron-core puts its vision tower on the first stage)"
    ]


def _swap_vision_q_and_k(source: str) -> str:
    """The module with layer 0's vision q and k rows exchanged on import (a wrong mapping)."""
    q = 'load("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight")'
    k = 'load("vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.weight")'
    assert source.count(q) == 1 and source.count(k) == 1
    return source.replace(q, "@@Q@@").replace(k, q).replace("@@Q@@", k)


def test_image_and_prompt_against_transformers_at_tp1_and_tp2(standin: dict[str, Any], tmp_path: Path) -> None:
    """One spawn of 2 processes: TP2, TP1 (two data-parallel replicas), and a module with a
    wrong vision mapping, which must fail."""
    from mapgen.common.parallel import ParallelLayout
    from mapgen.verify.jobs import verify
    from mapgen.verify.verdict import Job

    wrong = tmp_path / "llava_wrong_local.py"
    wrong.write_text(_swap_vision_q_and_k(standin["path"].read_text()))
    folder = str(standin["folder"])
    saved = _saved_by_transformers(standin["folder"], tmp_path / "saved")
    jobs = [
        Job(str(standin["path"]), folder, ParallelLayout(tp=2)),
        Job(str(standin["path"]), folder, ParallelLayout(tp=1, dp=2)),
        Job(str(wrong), folder, ParallelLayout(tp=2)),
        # transformers 5's naming of the tower: loaded, checked, and exported in that naming
        # (bit-exact against the files' own names)
        Job(str(standin["path"]), str(saved), ParallelLayout(tp=2)),
    ]
    good_tp2, good_tp1, bad, good_saved = verify(jobs, world_size=2)
    exported = len(standin["module"].HF_TENSORS)
    for result in (good_tp2, good_tp1, good_saved):
        assert result.error is None, result.error
        assert result.ok, result.summary()
        assert set(result.parts) == {"vision features", "projector output", "logits"}
        assert max(result.parts.values()) <= 1e-5
        assert result.tensors == result.bit_exact == exported
        assert result.mismatched == []
    assert not bad.ok
    assert bad.parts["vision features"] > 1e-3 and bad.parts["logits"] > 1e-3, bad.parts
    layer0 = f"{TOWER_PUBLISHED}encoder.layers.0.self_attn"
    assert sorted(bad.mismatched) == [f"{layer0}.k_proj.weight", f"{layer0}.q_proj.weight"]  # export undoes no swap


def _saved_by_transformers(folder: Path, out: Path) -> Path:
    """The stand-in with its vision tower named as transformers 5 saves it (`vision_tower.*`)."""
    out.mkdir()
    for file in folder.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            renamed = {
                "vision_tower." + n.removeprefix(TOWER_PUBLISHED) if n.startswith(TOWER_PUBLISHED) else n: t
                for n, t in tensors.items()
            }
            save_file(renamed, str(out / file.name), metadata={"format": "pt"})
        else:
            shutil.copy(file, out / file.name)
    return out


def test_either_naming_of_the_tower_loads_and_exports_as_it_came(standin: dict[str, Any], tmp_path: Path) -> None:
    """A LLaVA saved by transformers 5 (`vision_tower.embeddings.*`) is read as the published
    files (`vision_tower.vision_model.embeddings.*`): the same tensors under the module's names,
    and the checkpoint check finds nothing unknown; a Converter that loaded it exports and saves
    in that naming (the spawn of test_image_and_prompt_against_transformers_at_tp1_and_tp2).
    Files using both namings are refused: the other naming's tensors are unknown."""
    from mapgen.runtime.checkpoint import HFCheckpoint
    from mapgen.runtime.checkpoint_checks import checkpoint_problems, hf_namings

    module = standin["module"]
    assert module.HF_NAMINGS == {TOWER_PUBLISHED: "vision_tower."}
    saved = _saved_by_transformers(standin["folder"], tmp_path / "saved")
    published = HFCheckpoint(standin["folder"], namings=hf_namings(module))
    renamed = HFCheckpoint(saved, namings=hf_namings(module))
    assert published.naming == () and renamed.naming == ((TOWER_PUBLISHED, "vision_tower."),)
    assert sorted(renamed.names()) == sorted(published.names())
    name = f"{TOWER_PUBLISHED}embeddings.class_embedding"
    assert renamed.file_name(name) == "vision_tower.embeddings.class_embedding"
    assert torch.equal(renamed.get(name), published.get(name))
    assert checkpoint_problems(module, renamed) == []
    problems = checkpoint_problems(module, HFCheckpoint(saved))  # without the module's namings
    assert "missing tensor 'vision_tower.vision_model.embeddings.class_embedding'" in problems
    assert "does not map" in problems[-1] and "vision_tower.embeddings." in problems[-1]

    both = tmp_path / "both"
    shutil.copytree(saved, both)
    tensors = load_file(both / "model.safetensors")
    save_file({**tensors, name: tensors["vision_tower.embeddings.class_embedding"].clone()}, str(both / "model.safetensors"))
    problems = checkpoint_problems(module, HFCheckpoint(both, namings=hf_namings(module)))
    assert any("does not map" in p and "vision_tower.embeddings." in p for p in problems), problems


def test_a_save_keeps_the_naming_it_loaded(standin: dict[str, Any], tmp_path: Path, cpu_megatron: None) -> None:
    """Loaded from transformers 5's naming, saved back (save_hf_checkpoint with the Converter's
    naming, and save_hf_pretrained given the folder it loaded): the same names and bytes."""
    import mapgen
    from mapgen.common.parallel import ParallelLayout
    from mapgen.compiler.model_classes import build_model_chunks
    from mapgen.runtime.drivers import Converter
    from mapgen.runtime.save import save_hf_checkpoint

    module = standin["module"]
    saved = _saved_by_transformers(standin["folder"], tmp_path / "saved")
    chunks = build_model_chunks(module.DIMS, ParallelLayout(), model="llava")
    converter = Converter(module, chunks)
    converter.load(saved)
    assert converter.naming == ((TOWER_PUBLISHED, "vision_tower."),)
    config = json.loads((saved / "config.json").read_text())
    save_hf_checkpoint(module, chunks, tmp_path / "out", config, naming=converter.naming)
    mapgen.save_hf_pretrained(module, chunks, tmp_path / "out2", saved, make_vocab_size_divisible_by=1)
    expected = load_file(saved / "model.safetensors")
    ignored = tuple("vision_tower." + p.removeprefix(TOWER_PUBLISHED) for p in module.IGNORED_HF)
    expected = {n: t for n, t in expected.items() if not n.startswith(ignored)}
    for out in ("out", "out2"):
        written = {}
        for file in (tmp_path / out).glob("*.safetensors"):
            written.update(load_file(file))
        assert sorted(written) == sorted(expected)
        assert all(torch.equal(written[n].view(torch.uint8), expected[n].view(torch.uint8)) for n in expected)
    with pytest.raises(ValueError, match="not among"):
        save_hf_checkpoint(module, chunks, tmp_path / "out3", config, naming=(("a.", "b."),))


@pytest.mark.parametrize(
    ("hf", "roles"),
    [
        ("vision_tower.vision_model.encoder.layers.*.self_attn.{q,k,v}_proj.weight", ("q", "k", "v")),
        ("{q: 'a.*.q.weight', k: 'a.*.k.weight', v: 'a.*.v.weight'}", ("q", "k", "v")),
        ("vision_tower.vision_model.encoder.layers.*.self_attn.qkv.weight", ("hf",)),
        ("vision_tower.vision_model.encoder.layers.*.self_attn.{q,k}_proj.weight", None),
    ],
    ids=["q-k-v", "q-k-v-mapping", "concatenated", "two"],
)
def test_vision_qkv_takes_one_concatenated_tensor_or_q_k_v(hf: str, roles: tuple[str, ...] | None) -> None:
    from mapgen.common.errors import SpecError

    text = SPEC.read_text().replace(
        "hf: vision_tower.vision_model.encoder.layers.*.self_attn.{q,k,v}_proj.weight", f"hf: {hf}", 1
    )
    if roles is None:
        with pytest.raises(SpecError) as raised:
            parse_spec("llava.yaml", text)
        assert any("kind 'vision_qkv' takes 1 HF tensor(s) (hf) or 3 HF tensor(s) (q, k, v), the pattern names 2" in m for m in raised.value.messages)
        return
    spec = parse_spec("llava.yaml", text)
    (rule,) = [r for r in spec.rules if str(r.megatron) == "vision_model.decoder.layers.*.self_attention.linear_qkv.weight"]
    assert tuple(role for role, _ in rule.hf) == roles
