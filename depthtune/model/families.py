"""Model families as data: one row per transformers `model_type` depthtune knows, read by everything that differs
between them (scratch configs, closed-form counts, LoRA's usual targets, BitFit's biases, the frozen-prefix cache's
split forward, the memory model's block layout, masked-LM pretraining).

A new family is one row here plus a test at tiny size (tests/test_decoders.py, tests/test_audit.py): its closed
form below (a function of the config), and, for the prefix cache, the attribute names its forward uses. A
`model_type` with no row still trains (full, depth, LoRA with explicit targets): the audit then has no closed-form
check and the prefix cache runs the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


def attr(cfg, *names, default=None):
    """The first of `names` the config sets (families name one thing differently: hidden_size, dim, n_embd)."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def is_tied(cfg) -> bool:
    """A causal LM's lm_head shares the input embedding matrix (GPT-2 by default; Llama-family configs say)."""
    return bool(getattr(cfg, "tie_word_embeddings", False))


# ----------------------------------------------------------------------------- closed forms
# (cfg, N labels (0: none), lm_head: the model ends in a language-model head) -> (total parameters, the formula
# with its values); the lm_head counts only when untied (a tied one is the embedding matrix)


def bert_like(cfg, N: int, lm_head: bool) -> tuple[int, str]:
    V, H, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    I, P, T = cfg.intermediate_size, cfg.max_position_embeddings, cfg.type_vocab_size
    emb = (V + P + T) * H + 2 * H  # word + position + type tables, LayerNorm (gain, bias)
    layer = 4 * (H * H + H) + (H * I + I) + (I * H + H) + 2 * 2 * H  # q,k,v,out; ffn in,out; 2 LayerNorms
    if N == 0:
        rest, what = H * H + H, "pooler H^2+H"
    elif not FAMILIES[cfg.model_type].first_token_head:  # bert: the pooler, then the head
        rest, what = (H * H + H) + (H * N + N), "pooler H^2+H + head H*N+N"
    else:  # RobertaClassificationHead: dense H->H, out_proj H->N; no pooler
        rest, what = (H * H + H) + (H * N + N), "head dense H^2+H + out_proj H*N+N"
    return emb + L * layer + rest, (f"(V+P+T)*H+2H + L*(4(H^2+H) + 2HI+I+H + 4H) + {what}; "
                                    f"V={V} P={P} T={T} H={H} I={I} L={L} N={N}")


def distilbert(cfg, N: int, lm_head: bool) -> tuple[int, str]:
    V, D, L, Hd, P = cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.hidden_dim, cfg.max_position_embeddings
    emb = (V + P) * D + 2 * D
    layer = 4 * (D * D + D) + 2 * D + (D * Hd + Hd) + (Hd * D + D) + 2 * D
    rest = 0 if N == 0 else (D * D + D) + (D * N + N)  # pre_classifier + classifier
    return emb + L * layer + rest, f"(V+P)*D+2D + L*(4(D^2+D)+2D + 2D*Hd+Hd+D + 2D) + [D^2+D + D*N+N]; D={D} L={L}"


def gpt2(cfg, N: int, lm_head: bool) -> tuple[int, str]:
    V, D, L, P = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_positions
    I = cfg.n_inner or 4 * D
    emb = V * D + P * D
    layer = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * I + I) + (I * D + D)
    untied = lm_head and not is_tied(cfg)
    rest = 2 * D + (D * N if N else 0) + (V * D if untied else 0)  # ln_f + score (no bias) | lm_head untied
    return emb + L * layer + rest, (f"(V+P)*D + L*(4D + 3D^2+3D + D^2+D + 2DI+I+D) + 2D + "
                                    f"{'V*D' if untied else 'D*N'}; D={D} I={I} L={L}")


def llama_like(cfg, N: int, lm_head: bool) -> tuple[int, str]:
    V, H, L, I = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    nh = cfg.num_attention_heads
    nkv = attr(cfg, "num_key_value_heads", default=nh)
    hd = attr(cfg, "head_dim", default=H // nh)
    row = FAMILIES[cfg.model_type]
    attn = H * nh * hd + 2 * H * nkv * hd + nh * hd * H
    if getattr(cfg, "attention_bias", False) or row.qkv_bias:
        attn += nh * hd + 2 * nkv * hd + (H if getattr(cfg, "attention_bias", False) else 0)
    if row.qk_norm:
        attn += 2 * hd  # q_norm, k_norm
    mlp = 3 * H * I + ((2 * I + H) if getattr(cfg, "mlp_bias", False) else 0)
    layer = attn + mlp + 2 * H  # input + post-attention RMSNorm
    emb = V * H
    untied = lm_head and not is_tied(cfg)
    rest = H + (H * N if N else 0) + (V * H if untied else 0)  # final norm + score (no bias) | lm_head untied
    head = "V*H untied lm_head" if untied else ("tied lm_head" if lm_head else "H*N")
    return emb + L * layer + rest, (f"V*H + L*(H*nh*hd + 2H*nkv*hd + nh*hd*H + 3HI + 2H) + H + {head}; "
                                    f"V={V} H={H} L={L} I={I} nh={nh} nkv={nkv} hd={hd}")


# ----------------------------------------------------------------------------- the table

# model.scratch's names -> the family config's keyword (families that name them the transformers default way
# need no entry: vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
# max_position_embeddings)
DISTILBERT_NAMES = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                    "intermediate_size": "hidden_dim"}
GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
              "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"}


@dataclass(frozen=True)
class Family:
    model_type: str
    decoder: bool  # reads the last non-pad token; the only families that can be causal LMs
    # the block's layout, for the memory and FLOP model (depthtune.planning.audit): post_ln (BERT: post-LayerNorm, GELU,
    # dropout, attention probabilities kept) | pre_ln (GPT-2: pre-LayerNorm, gelu_new, dropout) | pre_rms (Llama:
    # pre-RMSNorm, GQA, SwiGLU, SDPA, no dropout)
    block: str
    closed_form: Optional[Callable] = None
    lora_targets: tuple = ()  # the attention's query and value projections: LoRA's usual pair
    biases: bool = True  # its linear layers carry biases by default (BitFit has something to train)
    config_names: dict = field(default_factory=dict)  # model.scratch's names -> this family's config keywords
    token_types: bool = False  # takes type_vocab_size (token type embeddings)
    grouped_query: bool = False  # takes num_key_value_heads and head_dim
    says_head_dim: bool = False  # head_dim always given to the config (qwen3's own default is 128 whatever H)
    qkv_bias: bool = False  # q/k/v projections have biases whatever config.attention_bias says (qwen2)
    qk_norm: bool = False  # an RMSNorm per head on q and k (qwen3)
    first_token_head: bool = False  # the classification head pools the first token itself (roberta)
    mlm_head: Optional[str] = None  # masked-LM head module: pretraining runs it on the predicted positions only
    # the frozen-prefix cache's split forward (depthtune.training.prefix_cache); encoders: embeddings + encoder.layer
    prefix_cache: bool = False
    blocks: str = ""  # decoders: the base model's block list (h | layers)
    final_norm: str = ""  # decoders: ln_f | norm
    rotary: bool = False  # decoders: rotary positions (else a learned position table added at the embeddings)
    # decoders: each block's attention: causal | per_layer (config.layer_types) | sliding (config.sliding_window)
    attention: str = "causal"
    special_ids: Optional[int] = None  # its config's bos/eos id: dropped when a smaller vocabulary has no such id


LLAMA_LIKE = dict(decoder=True, block="pre_rms", closed_form=llama_like, lora_targets=("q_proj", "v_proj"),
                  biases=False, grouped_query=True, says_head_dim=True, prefix_cache=True, blocks="layers",
                  final_norm="norm", rotary=True)

FAMILIES = {f.model_type: f for f in (
    Family("bert", decoder=False, block="post_ln", closed_form=bert_like, lora_targets=("query", "value"),
           token_types=True, mlm_head="cls", prefix_cache=True),
    Family("roberta", decoder=False, block="post_ln", closed_form=bert_like, lora_targets=("query", "value"),
           token_types=True, first_token_head=True, mlm_head="lm_head", prefix_cache=True),
    Family("distilbert", decoder=False, block="post_ln", closed_form=distilbert, lora_targets=("q_lin", "v_lin"),
           config_names=DISTILBERT_NAMES),
    Family("llama", **LLAMA_LIKE),
    Family("qwen2", **{**LLAMA_LIKE, "says_head_dim": False, "qkv_bias": True, "biases": True,
                       "attention": "per_layer"}),
    Family("qwen3", **{**LLAMA_LIKE, "qk_norm": True, "attention": "per_layer"}),
    Family("mistral", **{**LLAMA_LIKE, "attention": "sliding"}),
    Family("gpt2", decoder=True, block="pre_ln", closed_form=gpt2, lora_targets=("c_attn",),
           config_names=GPT2_NAMES, prefix_cache=True, blocks="h", final_norm="ln_f", special_ids=50256),
)}

ENCODER_TYPES = tuple(t for t, f in FAMILIES.items() if not f.decoder)
DECODER_TYPES = tuple(t for t, f in FAMILIES.items() if f.decoder)
GQA_TYPES = tuple(t for t, f in FAMILIES.items() if f.grouped_query)
UNKNOWN = Family("", decoder=False, block="post_ln")


def config_kwargs(arch) -> dict:
    """model.scratch (config.ScratchArch: one set of names for every family) -> the keyword arguments of the
    family's transformers config class (gpt2: n_embd, n_layer, ...)."""
    row = FAMILIES[arch.model_type]
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")
    kw = {row.config_names.get(n, n): getattr(arch, n) for n in names}
    if row.special_ids is not None and arch.vocab_size <= row.special_ids:
        kw.update(bos_token_id=None, eos_token_id=None)  # gpt2's bos/eos 50256 lie outside MiniLM's 30,522
    if row.token_types:
        kw["type_vocab_size"] = arch.type_vocab_size
    if row.grouped_query:
        kw["num_key_value_heads"] = arch.num_key_value_heads or arch.num_attention_heads
        if arch.head_dim is not None or row.says_head_dim:
            kw["head_dim"] = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    if row.decoder and arch.tie_word_embeddings is not None:
        kw["tie_word_embeddings"] = arch.tie_word_embeddings
    return kw


def family_of(model_type: Optional[str]) -> Family:
    """The row of a model_type; an unknown one gets UNKNOWN (an encoder-like block, no closed form, no cache)."""
    return FAMILIES.get(model_type or "", UNKNOWN)


def is_decoder(model_type: Optional[str]) -> bool:
    return family_of(model_type).decoder
