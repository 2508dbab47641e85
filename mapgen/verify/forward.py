"""The forward passes verification compares: megatron-core's and transformers', multi-token prediction included.

megatron-core's runs one stage (`megatron_logits`) or every pipeline stage by hand
(`pipeline_logits`); transformers' gives its logits (`hf_logits`) and each MTP layer's by the
published formula (`hf_mtp_logits`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

def pipeline_logits(chunks: list[Any], input_ids: torch.Tensor, ctx: Any, hidden_size: int) -> torch.Tensor | None:
    """Forward of one micro-batch through every (virtual) pipeline stage, by hand: megatron-core's
    schedules assume CUDA. Returns the logits on the rank that runs the last stage; with
    multi-token prediction, [batch, (1 + MTP layers) x seq, vocab]: the main model's logits,
    then each MTP layer's (see `_mtp_logits_returned`)."""
    batch, seq = input_ids.shape
    positions = torch.arange(seq).unsqueeze(0).expand_as(input_ids)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    logits = None
    pp = ctx.pp
    dtype = next(chunks[0].parameters()).dtype
    with torch.no_grad():
        for vp_stage, chunk in enumerate(chunks):
            for stage in range(pp.size):
                if stage != pp.rank:
                    continue
                first = vp_stage == 0 and stage == 0
                last = vp_stage == len(chunks) - 1 and stage == pp.size - 1
                if not first:
                    received = torch.empty(seq, batch, hidden_size, dtype=dtype)
                    source = (stage - 1) % pp.size
                    dist.recv(received, src=dist.get_global_rank(pp.handle, source))
                    chunk.set_input_tensor(received)
                with _mtp_logits_returned(chunk):
                    output = chunk(input_ids, positions, attention_mask=mask)
                if last:
                    logits = output
                else:
                    target = (stage + 1) % pp.size
                    dist.send(output.contiguous(), dst=dist.get_global_rank(pp.handle, target))
    return logits


@contextmanager
def _mtp_logits_returned(chunk: Any) -> Iterator[None]:
    """A GPTModel with an MTP block runs it on its last stage and appends its hidden states to
    the main model's along the sequence; with `mtp_num_layers` set it then turns them into an
    MTP loss, which needs labels (megatron-core 0.16 fails without them, 0.19 takes them from
    the input and drops the MTP hidden states). Here the setting is switched off once the block
    has run (megatron-core 0.19's block reads it), so the output layer gives the logits of both."""
    config: Any = getattr(chunk, "config", None)
    saved = getattr(config, "mtp_num_layers", None)
    if not getattr(chunk, "mtp_process", False) or saved is None:
        yield
        return

    def after_block(*_: Any) -> None:
        config.mtp_num_layers = None

    handle = chunk.mtp.register_forward_hook(after_block)
    try:
        yield
    finally:
        handle.remove()
        config.mtp_num_layers = saved


def megatron_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Forward of a single-stage GPTModel; [batch, seq, vocab] (gathered over TP by megatron)."""
    seq = input_ids.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(input_ids)
    # megatron-core's default causal mask is made on CUDA; True marks a masked position
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        output: torch.Tensor = model(input_ids, positions, attention_mask=mask)
    return output


def hf_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids).logits
    return logits


# The published multi-token-prediction formula's tensors, by model_type, named as each family's
# published checkpoint names them (independently of the spec's rules): for MTP layer d,
# (embedding, enorm, hnorm, eh_proj, final norm, output head, where the checkpoint keeps the
# layer's decoder-layer tensors). `{n}` is the checkpoint's layer number of MTP layer d.
MTP_FORMULA_TENSORS: dict[str, dict[str, str]] = {
    # DeepSeek-V3 report, section 2.2: MTP layer d is the checkpoint's decoder layer
    # num_hidden_layers + d, with its own copies of the embedding and the head
    "deepseek_v3": dict(
        embedding="model.layers.{n}.embed_tokens.weight", enorm="model.layers.{n}.enorm.weight",
        hnorm="model.layers.{n}.hnorm.weight", eh_proj="model.layers.{n}.eh_proj.weight",
        norm="model.layers.{n}.shared_head.norm.weight", head="model.layers.{n}.shared_head.head.weight",
        layer="model.layers.{n}.", number="num_hidden_layers + d",
    ),
    # GLM-4.5 and GLM-4.5-Air: DeepSeek-V3's layout and names (their published checkpoints ship
    # the embedding and head copies under the MTP layer too; vLLM's and SGLang's Glm4MoeMTP)
    "glm4_moe": dict(
        embedding="model.layers.{n}.embed_tokens.weight", enorm="model.layers.{n}.enorm.weight",
        hnorm="model.layers.{n}.hnorm.weight", eh_proj="model.layers.{n}.eh_proj.weight",
        norm="model.layers.{n}.shared_head.norm.weight", head="model.layers.{n}.shared_head.head.weight",
        layer="model.layers.{n}.", number="num_hidden_layers + d",
    ),
    # Qwen3-Next (the published checkpoint; vLLM's and SGLang's Qwen3NextMTP): one MTP layer,
    # fc([pre_fc_norm_embedding(embed); pre_fc_norm_hidden(h)]), a full-attention decoder layer
    # under mtp.layers.0, mtp.norm, the main embedding and lm_head
    "qwen3_next": dict(
        embedding="model.embed_tokens.weight", enorm="mtp.pre_fc_norm_embedding.weight",
        hnorm="mtp.pre_fc_norm_hidden.weight", eh_proj="mtp.fc.weight", norm="mtp.norm.weight",
        head="lm_head.weight", layer="mtp.layers.{d}.", number="num_hidden_layers + d",
    ),
}
# Qwen3.5 (dense and MoE text models): Qwen3-Next's MTP layout and names (mtp_num_hidden_layers)
MTP_FORMULA_TENSORS["qwen3_5_text"] = MTP_FORMULA_TENSORS["qwen3_5_moe_text"] = MTP_FORMULA_TENSORS["qwen3_next"]
# DeepSeek-V3.2: DeepSeek-V3's layout and names (its MTP layer has a DSA indexer too)
MTP_FORMULA_TENSORS["deepseek_v32"] = MTP_FORMULA_TENSORS["deepseek_v3"]
# per-layer config lists transformers derives when they are absent, by model_type (DeepSeek-V3.2: all
# DSA layers, dense then experts): dropped from a config of more layers, or extended by the last
DERIVED_PER_LAYER = {"deepseek_v32": ("layer_types", "mlp_layer_types")}


def hf_mtp_logits(model: Any, hf_dir: str | Path, module: Any, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The logits of each multi-token-prediction layer of the checkpoint in `hf_dir`, computed
    independently of megatron-core (and of the spec's rules) from transformers' own modules and
    the published MTP formula (DeepSeek-V3 report, section 2.2, which Qwen3-Next's MTP layer
    follows): for depth k (0-based) and position i, h'_i = eh_proj([enorm(embed(token_{i+k+1}));
    hnorm(h_i)]), then the checkpoint's MTP decoder layer (transformers' own decoder layer class,
    loaded by transformers from the checkpoint's tensors of that layer, as a decoder layer of a
    model built with one more layer, of the attention kind), then the final norm, then the head;
    h at depth 0 is the main model's last hidden state (after its final norm,
    `model.model(...).last_hidden_state`), at depth k + 1 the normalized output of depth k. The
    tensors' names are the published ones (`MTP_FORMULA_TENSORS`). Each is [batch, seq - k - 1,
    vocab]: the positions that have a next token."""
    import torch.nn.functional as F
    from transformers.masking_utils import create_causal_mask

    from mapgen.runtime.checkpoint import HFCheckpoint

    count = module.DIMS.mtp_num_layers
    if not count:
        return []
    names = MTP_FORMULA_TENSORS[model.config.model_type]
    checkpoint = HFCheckpoint(hf_dir, namings=tuple(getattr(module, "HF_NAMINGS", {}).items()))  # names as above
    dtype = next(model.parameters()).dtype
    main_layers = model.config.num_hidden_layers
    extended = _mtp_decoder_model(hf_dir, model.config, [names["layer"].format(d=d, n=main_layers + d) for d in range(count)], dtype)
    norm_class = type(model.model.norm)
    eps = model.config.rms_norm_eps

    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def tensor(key: str, depth: int) -> torch.Tensor:
        if key == "head" and tied and names["head"] == "lm_head.weight":  # the head is the embedding (Qwen3.5-0.8B)
            key = "embedding"
        return checkpoint.get(names[key].format(d=depth, n=main_layers + depth)).to(dtype)

    def norm(key: str, depth: int, x: torch.Tensor) -> torch.Tensor:
        weight = tensor(key, depth)
        module_ = norm_class(weight.shape[0], eps=eps).to(dtype)
        with torch.no_grad():
            module_.weight.copy_(weight)
        result: torch.Tensor = module_(x)
        return result

    found: list[torch.Tensor] = []
    with torch.no_grad():
        hidden = model.model(input_ids).last_hidden_state
        for depth in range(count):
            length = input_ids.shape[1] - depth - 1
            hidden = hidden[:, :length]
            embedded = F.embedding(input_ids[:, depth + 1 : depth + 1 + length], tensor("embedding", depth))
            joined = torch.cat((norm("enorm", depth, embedded), norm("hnorm", depth, hidden)), dim=-1)
            x = F.linear(joined, tensor("eh_proj", depth))
            positions = torch.arange(length).unsqueeze(0)
            mask = create_causal_mask(
                config=extended.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions,
                # DeepSeek-V3.2's indexer reads the mask: a tensor always, as its model makes it
                **({"allow_is_causal_skip": False} if model.config.model_type in DERIVED_PER_LAYER else {}),
            )
            x = extended.model.layers[main_layers + depth](
                x, attention_mask=mask, position_ids=positions,
                position_embeddings=extended.model.rotary_emb(x, positions),
            )
            hidden = norm("norm", depth, x)
            found.append(F.linear(hidden, tensor("head", depth)))
    return found


def _mtp_decoder_model(hf_dir: str | Path, config: Any, prefixes: list[str], dtype: torch.dtype) -> Any:
    """The checkpoint's model with one more decoder layer per MTP layer, each loaded by
    transformers (its own weight conversion) from the checkpoint's tensors under that MTP
    layer's prefix; an added layer is of the attention kind where the family has several."""
    import copy

    from transformers import AutoModelForCausalLM

    main_layers = config.num_hidden_layers
    # the model's own config, extended (a published Qwen3.5's config.json nests it: text_config)
    config = copy.deepcopy(config)
    config.num_hidden_layers = main_layers + len(prefixes)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types) + ["full_attention"] * len(prefixes)
    for key in DERIVED_PER_LAYER.get(config.model_type, ()):  # the MTP layers of the last layer's kind
        kinds = list(getattr(config, key))[:main_layers]
        setattr(config, key, kinds + kinds[-1:] * len(prefixes))
    mapping = {
        "^" + re.escape(prefix): f"model.layers.{main_layers + depth}."
        for depth, prefix in enumerate(prefixes)
        if prefix != f"model.layers.{main_layers + depth}."
    }
    auto: Any = AutoModelForCausalLM
    return auto.from_pretrained(hf_dir, config=config, dtype=dtype, key_mapping=mapping or None).eval()
