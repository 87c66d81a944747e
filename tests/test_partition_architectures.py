"""A sweep of partition.adam_mini over real transformers architectures, checked against each
model's own attention code, not against the names that partition/roles.py matches.

For every architecture a tiny model is built from its config (head_dim != hidden / heads and
grouped-query attention where the architecture allows them), and:

* the rows (columns for GPT-2 ``Conv1D``) that feed each query head, each key head and each
  value neuron are read off the model's forward: the attention call receives q, k, v split
  into heads by the model itself (``AttentionInterface``, or the split method of models that
  do not use it), and the gradient of one head's q with respect to a weight is nonzero exactly
  on that head's entries. The partition's blocks of every q/k/v weight (fused or not) must be
  exactly these sets: one block per q head, per k head and per v neuron;
* every other parameter gets its expected rule from its module type alone: token embeddings
  and the output layer (``get_input_embeddings``/``get_output_embeddings``) one block per
  token, other ``nn.Linear`` weights one per output row, ``Conv1D`` weights one per column,
  everything else (norms, biases, position embeddings) one block;
* no ``PartitionWarning`` is raised, except the one for stacked mixture-of-experts weights;
* ``optimizer.AdamMini`` steps on the model's loss, builds the same partition from
  ``model=``, and keeps one second-moment entry per block.

A few architectures also get their partition written out by hand, and the claims that the
official adam-mini 1.1.1 mishandles GPT-2 ``Conv1D``/fused ``c_attn``, an explicit ``head_dim``
and 1-D weights are shown side by side with ours.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import pytest
import torch
from torch import nn

import optimizer
import partition
from partition import PartitionWarning

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AttentionInterface"):  # transformers < 4.48
    pytest.skip("this transformers has no AttentionInterface to probe", allow_module_level=True)

H, NH, KV, HD, V = 32, 4, 2, 12, 61  # HD != H / NH on purpose
DEC = dict(hidden_size=H, intermediate_size=40, num_hidden_layers=2, vocab_size=V)
MHA = dict(DEC, num_attention_heads=NH)
GQA = dict(MHA, num_key_value_heads=KV, head_dim=HD)
GPT = dict(n_embd=H, n_layer=2, n_head=NH, vocab_size=V, n_positions=16)
FALCON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=NH, vocab_size=V)
MOE = "stacked mixture-of-experts"

# name: (model class, config kwargs, (q heads, kv heads), expected PartitionWarning or None)
ARCHS = {
    "gpt2": ("GPT2LMHeadModel", GPT, (NH, NH), None),
    "gpt2_cross_attention": ("GPT2LMHeadModel", dict(GPT, add_cross_attention=True), (NH, NH), None),
    "gpt_neox": ("GPTNeoXForCausalLM", dict(MHA, rotary_pct=0.5), (NH, NH), None),
    "gpt_neox_japanese": ("GPTNeoXJapaneseForCausalLM", MHA, (NH, NH), None),
    "gptj": ("GPTJForCausalLM", dict(GPT, rotary_dim=4), (NH, NH), None),
    "codegen": ("CodeGenForCausalLM", dict(GPT, rotary_dim=4), (NH, NH), None),
    "bloom": ("BloomForCausalLM", dict(hidden_size=H, n_layer=2, n_head=NH, vocab_size=V), (NH, NH), None),
    "falcon": ("FalconForCausalLM", dict(FALCON, multi_query=False), (NH, NH), None),
    "falcon_multi_query": ("FalconForCausalLM", dict(FALCON, multi_query=True), (NH, 1), None),
    "falcon_new_decoder": (
        "FalconForCausalLM",
        dict(FALCON, new_decoder_architecture=True, num_kv_heads=KV),
        (NH, KV),
        None,
    ),
    "llama": ("LlamaForCausalLM", GQA, (NH, KV), None),
    "mistral": ("MistralForCausalLM", GQA, (NH, KV), None),
    "mixtral": ("MixtralForCausalLM", dict(GQA, num_local_experts=3, num_experts_per_tok=2), (NH, KV), MOE),
    "qwen2": ("Qwen2ForCausalLM", GQA, (NH, KV), None),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        dict(GQA, moe_intermediate_size=20, shared_expert_intermediate_size=24, num_experts=3, num_experts_per_tok=2),
        (NH, KV),
        MOE,
    ),
    "qwen3": ("Qwen3ForCausalLM", GQA, (NH, KV), None),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        dict(GQA, moe_intermediate_size=20, num_experts=3, num_experts_per_tok=2),
        (NH, KV),
        MOE,
    ),
    "granitemoe": (  # its router sits under block_sparse_moe, not mlp
        "GraniteMoeForCausalLM",
        dict(GQA, num_local_experts=3, num_experts_per_tok=2),
        (NH, KV),
        MOE,
    ),
    "gemma": ("GemmaForCausalLM", GQA, (NH, KV), None),
    "gemma2": ("Gemma2ForCausalLM", GQA, (NH, KV), None),
    "gemma3_text": ("Gemma3ForCausalLM", GQA, (NH, KV), None),
    "phi": ("PhiForCausalLM", GQA, (NH, KV), None),
    "phi3": ("Phi3ForCausalLM", dict(GQA, pad_token_id=0), (NH, KV), None),
    "opt": (  # word_embed_proj_dim != hidden_size (OPT-350m): project_in / project_out
        "OPTForCausalLM",
        dict(hidden_size=H, ffn_dim=40, num_hidden_layers=2, num_attention_heads=NH, vocab_size=V,
             word_embed_proj_dim=16, max_position_embeddings=32),
        (NH, NH),
        None,
    ),
    "bert": ("BertForMaskedLM", MHA, (NH, NH), None),
    "roberta": ("RobertaForMaskedLM", MHA, (NH, NH), None),
    "distilbert": (
        "DistilBertForMaskedLM",
        dict(dim=H, hidden_dim=40, n_layers=2, n_heads=NH, vocab_size=V),
        (NH, NH),
        None,
    ),
    "albert": ("AlbertForMaskedLM", dict(MHA, embedding_size=16), (NH, NH), None),
    "t5": (
        "T5ForConditionalGeneration",
        dict(d_model=H, d_kv=HD, d_ff=40, num_layers=2, num_heads=NH, vocab_size=V),
        (NH, NH),
        None,
    ),
    "switch_transformers": (  # d_kv, not head_dim, and no attribute_map from one to the other
        "SwitchTransformersForConditionalGeneration",
        dict(d_model=H, d_kv=HD, d_ff=40, num_layers=2, num_heads=NH, vocab_size=V, num_experts=2,
             num_sparse_encoder_layers=1, num_sparse_decoder_layers=1),
        (NH, NH),
        None,
    ),
    "bart": (  # the two stacks have their own head counts
        "BartForConditionalGeneration",
        dict(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=NH,
             decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40, vocab_size=V,
             max_position_embeddings=32),
        (NH, NH),
        None,
    ),
    "mpt": ("MptForCausalLM", dict(d_model=H, n_heads=NH, n_layers=2, vocab_size=V, expansion_ratio=2), (NH, NH), None),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", GPT, (NH, 1), None),
    "ctrl": (  # its token embedding is named "w": found by get_input_embeddings()
        "CTRLLMHeadModel",
        dict(n_embd=H, n_layer=2, n_head=NH, dff=40, vocab_size=V, n_positions=16),
        (NH, NH),
        None,
    ),
    "gpt_neo": (
        "GPTNeoForCausalLM",
        dict(hidden_size=H, num_layers=2, num_heads=NH, attention_types=[[["global", "local"], 1]],
             vocab_size=V, max_position_embeddings=32),
        (NH, NH),
        None,
    ),
    "stablelm": ("StableLmForCausalLM", dict(MHA, num_key_value_heads=KV, qk_layernorm=True), (NH, KV), None),
    "olmo": ("OlmoForCausalLM", GQA, (NH, KV), None),
    "olmo2": ("Olmo2ForCausalLM", GQA, (NH, KV), None),
    "starcoder2": ("Starcoder2ForCausalLM", GQA, (NH, KV), None),
    "persimmon": ("PersimmonForCausalLM", dict(MHA, qk_layernorm=True), (NH, NH), None),
    "granite": ("GraniteForCausalLM", GQA, (NH, KV), None),
    "cohere": ("CohereForCausalLM", dict(GQA, use_qk_norm=True), (NH, KV), None),
    "deberta": ("DebertaForMaskedLM", MHA, (NH, NH), None),  # fused in_proj: q, k, v per head
    "deberta_v2": (  # DeBERTa-v3's relative attention: query_proj / key_proj also project positions
        "DebertaV2ForMaskedLM",
        dict(MHA, relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
             position_buckets=8, max_relative_positions=16, norm_rel_ebd="layer_norm",
             max_position_embeddings=32),
        (NH, NH),
        None,
    ),
}  # fmt: skip
DECODER_HEADS = {"bart": (2, 2)}  # (q, kv) heads of the decoder stack where they differ


def build(arch: str, seed: int = 0) -> nn.Module:
    cls_name, kwargs, _, _ = ARCHS[arch]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    config = cls.config_class(**kwargs)
    config._attn_implementation_internal = "eager"
    torch.manual_seed(seed)
    return cls(config)


def inputs(model: nn.Module, labels: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=g)
    out = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        out["decoder_input_ids"] = ids.flip(1)
    if getattr(model.config, "add_cross_attention", False):
        width = model.get_input_embeddings().weight.shape[1]
        out["encoder_hidden_states"] = torch.randn(2, 7, width, generator=g)
    if labels:
        out["labels"] = ids
    return out


# ------------------------------------------------------------------ q, k, v as the model splits them
PROBE = "adam_mini_lab_probe"
CALLS: list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (module, q, k, v)


def _probe_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """An attention implementation that records q, k, v ``(batch, heads, seq, head_dim)``."""
    CALLS.append((module, query, key, value))
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, *args, **kwargs)


transformers.AttentionInterface.register(PROBE, _probe_attention)


class _Passthrough(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


class _MatmulCapture(torch.overrides.TorchFunctionMode):
    """MPT and Perceiver multiply q @ k^T, then probs @ v, inline: record both while an attention
    runs. Idefics's resampler does the same with einsum ("i d, j d -> i j": k untransposed).
    DeBERTa (v1) chunks each head's fused rows into q, k, v inline: record the first chunk
    while its attention (``chunking``) runs."""

    def __init__(self):
        super().__init__()
        self.module, self.args, self.chunking = None, [], None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        products = (torch.matmul, torch.Tensor.__matmul__, torch.einsum)
        if self.module is not None and func in products:
            self.args.append(args[1:] if func is torch.einsum else args)
            if len(self.args) == 2:
                (q, k), (_, v) = self.args
                k = k if func is torch.einsum else k.transpose(-1, -2)
                CALLS.append((self.module, q, k, v))
                self.args = []
        out = func(*args, **(kwargs or {}))
        if self.chunking is not None and func is torch.Tensor.chunk:
            CALLS.append((self.chunking, *out))  # (batch, heads, seq, head_dim) each
            self.chunking = None
        return out


def _install_probes(model: nn.Module, capture: _MatmulCapture) -> None:
    for module in model.modules():  # a composite model's towers come from their own files
        config = getattr(module, "config", None)
        uses = "ALL_ATTENTION_FUNCTIONS" in vars(sys.modules[type(module).__module__])
        if uses and isinstance(config, transformers.PretrainedConfig):
            config._attn_implementation_internal = PROBE
    for module in model.modules():
        # norms of q / k do not change which rows feed a head, but one over all heads (OLMo2)
        # would make every row feed every head: take the split of the projection itself
        for child in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
            if isinstance(getattr(module, child, None), nn.Module):
                setattr(module, child, _Passthrough())
        cls = type(module).__name__

        def record(method, module=module, transpose=False):
            def wrapped(*args, **kwargs):
                q, k, v = method(*args, **kwargs)
                if transpose:  # (batch, seq, heads, head_dim) -> (batch, heads, seq, head_dim)
                    CALLS.append((module, *(x.transpose(1, 2) for x in (q, k, v))))
                else:
                    CALLS.append((module, q, k, v))
                return q, k, v

            return wrapped

        if cls == "BloomAttention":
            module._reshape = record(module._reshape)
        elif cls == "FalconAttention" and hasattr(module, "_split_heads"):  # transformers<5.25
            module._split_heads = record(module._split_heads, transpose=True)
        elif cls in ("GPTNeoSelfAttention", "GPTNeoXJapaneseAttention"):
            attn = module._attn

            def _attn(q, k, v, *args, module=module, attn=attn, **kwargs):
                CALLS.append((module, q, k, v))
                return attn(q, k, v, *args, **kwargs)

            module._attn = _attn
        elif cls == "DisentangledSelfAttention" and hasattr(module, "in_proj"):  # DeBERTa v1
            module.register_forward_pre_hook(lambda m, a: setattr(capture, "chunking", m))
        elif cls == "DisentangledSelfAttention":  # DeBERTa-v2: (batch * heads, seq, head_dim)
            seen = []  # q, k, v, then the relative-position projections (not recorded)
            split = module.transpose_for_scores

            def transpose_for_scores(x, heads, module=module, split=split, seen=seen):
                out = split(x, heads)
                seen.append(out.view(-1, heads, *out.shape[1:]))
                if len(seen) == 3:
                    CALLS.append((module, *seen))
                return out

            module.transpose_for_scores = transpose_for_scores
        elif cls in ("MptAttention", "PerceiverSelfAttention", "IdeficsPerceiverAttention"):
            module.register_forward_pre_hook(lambda m, a: setattr(capture, "module", m))
            module.register_forward_hook(lambda m, a, o: setattr(capture, "module", None))


def head_supports(
    model: nn.Module, batch: dict[str, torch.Tensor] | None = None
) -> dict[str, dict[str, dict[tuple[int, ...], tuple]]]:
    """``{weight name: {role: {entries: target}}}``: for every q head, k head and v neuron that
    the model's attention receives on ``batch`` (default :func:`inputs`), the flat indices of the
    entries of each attention weight that feed it (nonzero gradient), over the first call of
    every attention module."""
    CALLS.clear()
    capture = _MatmulCapture()
    _install_probes(model, capture)
    model.eval()
    with capture:
        model(**(inputs(model, labels=False) if batch is None else batch))
    first = {}
    for call in CALLS:  # ALBERT shares its layer: later calls also see the earlier ones
        first.setdefault(id(call[0]), call)
    assert first, "the probe saw no attention call"
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict = {}
    g = torch.Generator().manual_seed(2)
    for module, q, k, v in first.values():
        weights = [p for p in module.parameters() if p.ndim >= 2]
        targets = [("q", (h,), q[:, h]) for h in range(q.shape[1])]
        targets += [("k", (h,), k[:, h]) for h in range(k.shape[1])]
        targets += [
            ("v", (h, d), v[:, h, :, d]) for h in range(v.shape[1]) for d in range(v.shape[3])
        ]
        for role, where, t in targets:
            r = torch.randn(t.shape, generator=g, dtype=t.dtype)
            grads = torch.autograd.grad(
                (t * r).sum(), weights, retain_graph=True, allow_unused=True
            )
            for p, grad in zip(weights, grads, strict=True):
                if grad is not None and grad.count_nonzero():
                    entries = tuple(grad.flatten().nonzero().flatten().tolist())
                    out.setdefault(names[id(p)], {}).setdefault(role, {})[entries] = where
    return out


def block_sets(part: partition.Partition, name: str) -> set[tuple[int, ...]]:
    """The blocks of one tensor as sets of flat indices."""
    ids = part[name].local_index().flatten()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=part[name].num_blocks).tolist()
    return {tuple(chunk.tolist()) for chunk in torch.split(order, counts)}


def expected_rule(model: nn.Module, name: str, param: nn.Parameter, owner: nn.Module) -> str:
    """The rule of a parameter that is no q/k/v weight, from its module type alone."""
    tokens = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        tokens.add(id(model.get_output_embeddings().weight))
    if id(param) in tokens:
        return "rows"  # one block per token
    if param.ndim == 1:
        return "tensor"
    if param.ndim == 3 and "experts" in name:
        return "experts"
    if isinstance(owner, nn.Linear) or "Router" in type(owner).__name__:
        return "rows"  # one block per output neuron (a router's outputs are its experts)
    if type(owner).__name__ == "Conv1D":
        return "columns"
    return "tensor"  # position / token-type embeddings, T5's relative bias, 2-D norms


def adam_mini_checked(model: nn.Module, arch: str) -> partition.Partition:
    """``partition.adam_mini(model)`` with every PartitionWarning an error, except the expected."""
    expected = ARCHS[arch][3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        part = partition.adam_mini(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, PartitionWarning)]
    assert [m for m in messages if expected is None or expected not in m] == []
    if expected is not None:
        assert any(expected in m for m in messages)
    return part


@pytest.mark.parametrize("arch", list(ARCHS))
def test_blocks_follow_the_models_own_head_split(arch):
    model = build(arch)
    part = adam_mini_checked(model, arch)
    part.check(model)
    supports = head_supports(model)
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    assert any("q" in roles for roles in supports.values())
    for name, roles in supports.items():
        decoder = arch in DECODER_HEADS and "decoder" in name.split(".")
        nq, nkv = DECODER_HEADS[arch] if decoder else ARCHS[arch][2]
        for role, sets in roles.items():
            width = 1 + max(where[-1] for where in sets.values()) if role == "v" else None
            want = {"q": nq, "k": nkv, "v": nkv * (width or 0)}[role]  # v: one per neuron
            assert len(sets) == want, f"{name}: {len(sets)} distinct {role} blocks, not {want}"
            if role == "q" and (HD in ARCHS[arch][1].values()):  # the explicit head_dim is real
                assert {len(entries) for entries in sets} == {HD * H}, name
        found = {entries for sets in roles.values() for entries in sets}
        assert block_sets(part, name) == found, f"{name}: {part[name].rule} {part[name].params}"
    for name, param in model.named_parameters():
        if name in supports:
            continue
        rule = expected_rule(model, name, param, owners[id(param)])
        tb = part[name]
        if rule == "experts":  # the rules' limit: one block per expert, and the warning says so
            assert tb.rule == "rows" and tb.num_blocks == param.shape[0], name
            continue
        got = tb.local_index()
        if rule == "rows":
            want_ids = torch.arange(param.shape[0]).view(-1, *[1] * (param.ndim - 1))
        elif rule == "columns":
            want_ids = torch.arange(param.shape[1]).view(1, -1)
        else:
            want_ids = torch.zeros(1, dtype=torch.long)
        assert torch.equal(got, want_ids.expand_as(got)), f"{name}: want {rule}, got {tb.rule}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_adam_mini_steps_with_one_v_entry_per_block(arch):
    model = build(arch)
    part = adam_mini_checked(model, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartitionWarning)
        auto = optimizer.AdamMini(model.named_parameters(), partition=None, model=model)
    assert auto.partition.tensors() == part.tensors()
    opt = optimizer.AdamMini(model.named_parameters(), partition=part, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    model(**inputs(model)).loss.backward()
    opt.step()
    stepped = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert stepped
    assert sum(opt.state[p]["exp_avg_sq"].numel() for _, p in stepped) == sum(
        part[n].num_blocks for n, _ in stepped
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ------------------------------------------------------------------ written out by hand
def same_blocks(part: partition.Partition, name: str, ids: torch.Tensor) -> bool:
    """The tensor's blocks are those of ``ids`` (any numbering)."""
    ids = ids.expand(part[name].shape)
    pairs = set(
        zip(part[name].local_index().flatten().tolist(), ids.flatten().tolist(), strict=True)
    )
    return len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def rows_of(ids: list[int], cols: int | None = None) -> torch.Tensor:
    t = torch.tensor(ids)
    return t.view(1, -1) if cols else t.view(-1, 1)


def test_hand_written_llama_gqa_with_explicit_head_dim():
    model = build("llama")
    part = adam_mini_checked(model, "llama")
    a = "model.layers.1.self_attn."
    assert same_blocks(part, a + "q_proj.weight", rows_of([r // HD for r in range(NH * HD)]))
    assert same_blocks(part, a + "k_proj.weight", rows_of([r // HD for r in range(KV * HD)]))
    assert same_blocks(part, a + "v_proj.weight", rows_of(list(range(KV * HD))))
    assert same_blocks(part, a + "o_proj.weight", rows_of(list(range(H))))
    assert same_blocks(part, "model.layers.1.mlp.gate_proj.weight", rows_of(list(range(40))))
    assert same_blocks(part, "model.embed_tokens.weight", rows_of(list(range(V))))
    assert same_blocks(part, "model.norm.weight", torch.zeros(1, dtype=torch.long))
    per_layer = NH + KV + KV * HD + H + 40 + 40 + H + 2  # q, k, v, o, gate, up, down, 2 norms
    lm_head = 0 if model.config.tie_word_embeddings else V
    assert part.num_blocks == V + 2 * per_layer + 1 + lm_head


def test_hand_written_gpt2_conv1d_columns_and_cross_attention():
    model = build("gpt2_cross_attention")
    part = adam_mini_checked(model, "gpt2_cross_attention")
    hd = H // NH
    c_attn = [j // hd for j in range(2 * H)] + [2 * NH + j for j in range(H)]  # q | k | v
    assert same_blocks(part, "transformer.h.0.attn.c_attn.weight", rows_of(c_attn, cols=True))
    x = "transformer.h.0.crossattention."
    q_attn = [j // hd for j in range(H)]
    kv = [j // hd for j in range(H)] + [NH + j for j in range(H)]  # k | v from the encoder
    assert same_blocks(part, x + "q_attn.weight", rows_of(q_attn, cols=True))
    assert same_blocks(part, x + "c_attn.weight", rows_of(kv, cols=True))
    assert same_blocks(part, x + "c_proj.weight", rows_of(list(range(H)), cols=True))
    assert same_blocks(
        part, "transformer.h.0.mlp.c_fc.weight", rows_of(list(range(4 * H)), cols=True)
    )
    assert same_blocks(part, "transformer.wpe.weight", torch.zeros(1, dtype=torch.long))
    # same_blocks sees only the blocks in use: an empty q (k|v) section must add none
    assert part[x + "q_attn.weight"].num_blocks == NH
    assert part[x + "c_attn.weight"].num_blocks == NH + H


def test_hand_written_t5_shared_embedding_and_relative_bias():
    model = build("t5")
    part = adam_mini_checked(model, "t5")
    assert same_blocks(part, "shared.weight", rows_of(list(range(V))))  # tied: input and output
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert same_blocks(part, bias, torch.zeros(1, dtype=torch.long))
    q = "decoder.block.1.layer.1.EncDecAttention.q.weight"
    assert same_blocks(part, q, rows_of([r // HD for r in range(NH * HD)]))  # d_kv = HD
    # from names alone too: "shared" is the token embedding
    named = partition.adam_mini(model.named_parameters(), n_heads=NH, head_dim=HD)
    assert named["shared.weight"] == part["shared.weight"]


# ------------------------------------------------------------------ the official adam-mini 1.1.1
def official_v_entries(model: nn.Module, **kwargs) -> dict[str, int]:
    """Second-moment entries per tensor after one step of the official Adam_mini."""
    adam_mini = pytest.importorskip("adam_mini")
    opt = adam_mini.Adam_mini(model.named_parameters(), lr=1e-3, verbose=False, **kwargs)
    model(**inputs(model)).loss.backward()
    with contextlib.redirect_stdout(io.StringIO()):
        opt.step()
    return {
        n: opt.state[p]["vmean" if "vmean" in opt.state[p] else "v"].numel()
        for n, p in model.named_parameters()
    }


def test_official_adam_mini_misses_gpt2_conv1d_and_fused_c_attn():
    model = build("gpt2")
    theirs = official_v_entries(model, dim=H, n_heads=NH)
    part = adam_mini_checked(model, "gpt2")
    c_attn, c_fc = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"
    assert theirs[c_attn] == 1  # q|k|v fused into one block
    assert theirs[c_fc] == H  # one block per input row of the (in, out) weight
    assert part[c_attn].num_blocks == 2 * NH + H and part[c_fc].num_blocks == 4 * H


def test_official_adam_mini_cuts_heads_with_an_explicit_head_dim():
    model = build("qwen3")
    theirs = official_v_entries(model, dim=H, n_heads=NH, n_kv_heads=KV)
    q = "model.layers.0.self_attn.q_proj.weight"
    # chunks of dim^2 / n_heads = 8 rows, which cut through the 12-row heads: 6 blocks, not 4
    assert theirs[q] == NH * HD * H // (H * H // NH)
    assert adam_mini_checked(model, "qwen3")[q].num_blocks == NH


def test_official_adam_mini_fails_on_1d_weights_with_matrix_names():
    """BERT's embeddings.LayerNorm.weight is 1-D but named like an embedding."""
    model = build("bert")
    with pytest.raises(IndexError):
        official_v_entries(model, dim=H, n_heads=NH)
    part = adam_mini_checked(model, "bert")
    assert part["bert.embeddings.LayerNorm.weight"].rule == "tensor"
    opt = optimizer.AdamMini(model.named_parameters(), partition=part)
    model.zero_grad()
    model(**inputs(model)).loss.backward()
    opt.step()
    assert opt.state[model.bert.embeddings.LayerNorm.weight]["exp_avg_sq"].numel() == 1


def test_deepseek_v32_sparse_attention_indexer_keys_are_not_the_models_keys():
    """The DSA indexer's ``wk`` (one index head of ``index_head_dim``) was split with the model's
    key heads and refused the whole model; multi-head latent attention itself has no Adam-mini
    rule yet (one block per tensor, with the warning)."""
    cls = getattr(transformers, "DeepseekV32ForCausalLM", None)
    if cls is None:
        pytest.skip("no DeepSeek-V3.2 in this transformers")
    config = cls.config_class(
        hidden_size=H, intermediate_size=40, moe_intermediate_size=20, num_hidden_layers=1,
        num_attention_heads=NH, num_key_value_heads=NH, vocab_size=V, kv_lora_rank=8,
        q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, index_n_heads=2,
        index_head_dim=8, n_routed_experts=3, num_experts_per_tok=2, first_k_dense_replace=1,
    )  # fmt: skip
    with torch.device("meta"):
        model = cls(config)
    with pytest.warns(PartitionWarning, match="indexer.wk.weight"):
        part = partition.adam_mini(model)
    assert part["model.layers.0.self_attn.indexer.wk.weight"].rule == "tensor"
    assert part["model.layers.0.self_attn.o_proj.weight"].num_blocks == H


def test_bigbird_pooler_is_a_dense_layer():
    """BigBird names its pooler's nn.Linear "pooler" itself (BERT: pooler.dense)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        part = partition.adam_mini({"bert.pooler.weight": torch.empty(H, H)})
    assert part["bert.pooler.weight"].rule == "rows"


RELATIVE = {  # DeBERTa's relative attention: (config, its c2p and p2c projections)
    "deberta": (
        transformers.DebertaConfig(**dict(MHA, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                          max_relative_positions=16, max_position_embeddings=32)),
        ("pos_proj", "pos_q_proj"),
    ),
    "deberta_v2": (
        transformers.DebertaV2Config(**dict(ARCHS["deberta_v2"][1], share_att_key=False)),
        ("pos_key_proj", "pos_query_proj"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(RELATIVE))
def test_deberta_relative_position_projections_are_split_by_head(arch):
    """DeBERTa's c2p and p2c projections (v1: pos_proj / pos_q_proj; v2 without share_att_key:
    pos_key_proj / pos_query_proj) project the relative position embeddings into heads, and the
    rows of head h enter only head h's attention scores (c2p: q_h . pos_k_h, p2c:
    k_h . pos_q_h): one block per head, as for query and key."""
    config, projections = RELATIVE[arch]
    torch.manual_seed(0)
    model = getattr(transformers, ARCHS[arch][0])(config)
    part = adam_mini_checked(model, arch)
    for name, roles in head_supports(model).items():
        assert block_sets(part, name) == {e for sets in roles.values() for e in sets}, name
    names = {id(p): n for n, p in model.named_parameters()}
    probs = model(**inputs(model, labels=False), output_attentions=True).attentions
    g = torch.Generator().manual_seed(2)
    for layer, p in zip(model.deberta.encoder.layer, probs, strict=True):
        for proj in projections:
            weight = getattr(layer.attention.self, proj).weight
            found = set()
            for h in range(NH):
                r = torch.randn(p[:, h].shape, generator=g)
                (grad,) = torch.autograd.grad((p[:, h] * r).sum(), weight, retain_graph=True)
                found.add(tuple(grad.flatten().nonzero().flatten().tolist()))
            assert len(found) == NH
            assert block_sets(part, names[id(weight)]) == found, names[id(weight)]


def test_deberta_talking_heads_are_split_by_output_head():
    """DeBERTa's talking heads (``talking_head=True``): head_logits_proj mixes the heads' scores
    before the softmax, head_weights_proj their probabilities after it, each an (NH, NH) linear
    map whose row h feeds only head h: one block per row, each moving one head's attention."""
    torch.manual_seed(0)
    model = transformers.DebertaForMaskedLM(transformers.DebertaConfig(**MHA, talking_head=True))
    part = adam_mini_checked(model, "deberta")
    for layer in model.deberta.encoder.layer:
        with torch.no_grad():  # head h's probabilities are then head h's logits' softmax alone
            layer.attention.self.head_weights_proj.weight.copy_(torch.eye(NH))
    names = {id(p): n for n, p in model.named_parameters()}
    probs = model(**inputs(model, labels=False), output_attentions=True).attentions
    g = torch.Generator().manual_seed(2)
    for layer, p in zip(model.deberta.encoder.layer, probs, strict=True):
        for proj in ("head_logits_proj", "head_weights_proj"):
            weight = getattr(layer.attention.self, proj).weight
            name = names[id(weight)]
            assert part[name].rule == "rows" and part[name].num_blocks == NH, name
            found = set()
            for h in range(NH):
                r = torch.randn(p[:, h].shape, generator=g)
                (grad,) = torch.autograd.grad((p[:, h] * r).sum(), weight, retain_graph=True)
                found.add(tuple(grad.flatten().nonzero().flatten().tolist()))
            assert block_sets(part, name) == found, name


def test_deberta_in_proj_is_split_only_with_its_module():
    """Names alone do not tell DeBERTa's fused in_proj (q, k, v per head) from another model's
    (Mamba's holds x and z): one block each and the warning, as documented."""
    model = build("deberta")
    with pytest.warns(PartitionWarning, match="attention.self.in_proj.weight"):
        named = partition.adam_mini(model.named_parameters(), n_heads=NH)
    assert named["deberta.encoder.layer.0.attention.self.in_proj.weight"].rule == "tensor"
    assert adam_mini_checked(model, "deberta").provenance["n_heads_by_module"] == {
        f"deberta.encoder.layer.{i}.attention.self": NH for i in range(2)
    }


PERCEIVER = dict(  # qk_channels = 12: neither d_model, d_latents nor v_channels
    num_latents=4, d_latents=16, d_model=8, num_blocks=1, num_self_attends_per_block=1,
    num_cross_attention_heads=2, num_self_attention_heads=4, qk_channels=12, v_channels=16,
    vocab_size=V, max_position_embeddings=8,
)  # fmt: skip
# each attention module's heads: the encoder's by the config, the masked-LM decoder's its own 8
PERCEIVER_HEADS = {"cross_attention": 2, "self_attends": 4, "decoding_cross_attention": 8}


@pytest.mark.parametrize("cls_name", ["PerceiverModel", "PerceiverForMaskedLM"])
def test_perceiver_attentions_are_split_by_their_own_heads(cls_name):
    """Perceiver's latents cross-attend to the inputs with num_cross_attention_heads, then attend
    to themselves with num_self_attention_heads (of qk_channels / heads each), and the masked-LM
    decoder's cross-attention has 8 heads of 32, which no config field holds: no one head count
    fits, so each attention is split by its own. Every query and key block must be the rows that
    feed one of the heads that attention receives, with no head count passed."""
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(transformers.PerceiverConfig(**PERCEIVER))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        part = partition.adam_mini(model)
    part.check(model)
    g = torch.Generator().manual_seed(1)
    if cls_name == "PerceiverModel":
        batch = {"inputs": torch.randn(2, 3, PERCEIVER["d_model"], generator=g)}
    else:
        batch = {
            "input_ids": torch.randint(V, (2, PERCEIVER["max_position_embeddings"]), generator=g)
        }
    seen = set()
    for name, roles in head_supports(model, batch).items():
        (attention,) = [a for a in PERCEIVER_HEADS if a in name.split(".")]
        seen.add(attention)
        for role, sets in roles.items():  # v: one block per neuron, whatever the heads
            assert role == "v" or len(sets) == PERCEIVER_HEADS[attention], f"{name}: {role}"
        found = {entries for sets in roles.values() for entries in sets}
        assert block_sets(part, name) == found, f"{name}: {part[name].rule} {part[name].params}"
    decoder = cls_name == "PerceiverForMaskedLM"
    assert seen == set(PERCEIVER_HEADS) - (set() if decoder else {"decoding_cross_attention"})
    assert set(part.provenance["n_heads_by_module"].values()) == {PERCEIVER_HEADS[a] for a in seen}
