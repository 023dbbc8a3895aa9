"""The layer-streamed forward every pass runs (importance, GPTQ, OTP capture, probes), and what each MoE block saw.

Only one decoder layer's weights are resident at a time: the model skeleton lives on the ``meta`` device, each
layer is materialised from the safetensors shards (through its architecture adapter) on the stream's compute
device (CPU or a GPU), run over all calibration sequences, and dropped. Hidden states are carried forward between
layers on that device.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch

from ..converters import get_architecture, supported_architectures
from ..errors import McsharpError
from ..stages import release_free_memory
from .checkpoint import safetensors_header
from .names import MIN_ROWS

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class SafetensorsIndex:
    """Lazy access to every tensor of a checkpoint by name (only what is asked for is read).

    Tensors are read with plain file reads, not memory maps: a mapped shard's pages would count in this
    process's resident memory for as long as it stays open, i.e. the whole checkpoint by the last layer.
    Every shard's header is checked at open (truncated or corrupt shard → one-line error naming it). Tensors
    come back on ``device``, widened to float32 and checked there (a GPU does that much faster than the CPU);
    ``names[k](widen=False)`` keeps the checkpoint's dtype.
    """

    def __init__(self, model_dir: Path, device: torch.device | str = "cpu"):
        self.names: dict[str, Callable[[], torch.Tensor]] = {}
        for shard in sorted(model_dir.glob("*.safetensors")):
            start, header = safetensors_header(shard)
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if v["dtype"] not in _DTYPES:
                    raise McsharpError(f"{shard}: tensor {k} is {v['dtype']}; supported: {', '.join(_DTYPES)} "
                                       "(dequantise the checkpoint to bf16 first)")
                self.names[k] = partial(_read_tensor, shard, k, start + v["data_offsets"][0],
                                        v["data_offsets"][1] - v["data_offsets"][0], _DTYPES[v["dtype"]],
                                        tuple(v["shape"]), torch.device(device))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.names[key]()


def _read_tensor(path: Path, name: str, offset: int, n_bytes: int, dtype: torch.dtype, shape: tuple[int, ...],
                 device: torch.device | str = "cpu", widen: bool = True) -> torch.Tensor:
    """Tensor ``name`` of a safetensors shard as float32 (without ``widen``: as stored) on ``device``, read (not
    mapped) from ``path``; NaN/Inf → error naming it (nothing computed from it would mean anything)."""
    buf = bytearray(n_bytes)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf) != n_bytes:
            raise McsharpError(f"{path} is truncated; re-download or re-save it")
    if not n_bytes:
        return torch.zeros(shape, device=device, dtype=torch.float32 if widen else dtype)
    t = torch.frombuffer(buf, dtype=dtype).reshape(shape).to(device)
    t = t.float() if widen else t
    bad = int(t.numel() - torch.isfinite(t).sum())
    if bad:
        raise McsharpError(f"{path}: tensor {name} holds {bad} NaN/Inf values; fix or re-save the checkpoint "
                           "(a compressed conversion needs finite weights; --preset F16/BF16 copies them as they are)")
    return t


# A pass's work on one decoder layer: (index, materialised layer, run = the layer over all sequences, its input
# hidden states) → the next layer's input (usually run(hidden), or the output of the layer as the pass changed it).
LayerStep = Callable[[int, torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


class ExpertMatrices:
    """Where the one-expert-at-a-time forward (``EXPERTS_ONE_AT_A_TIME``) takes expert ``e``'s float32 matrices
    from: the layer's stacked experts as they are when float32; kept in the checkpoint's dtype (bf16), widened
    into one reused buffer per projection; and for experts a pass has replaced (GPTQ's finished experts,
    ``replaced[e](name, buffer)`` fills the buffer), their replacement. A Mixtral-8x7B layer's experts are
    5.6 GB in float32, 2.8 GB as stored. The buffers are reused from one expert to the next within a forward
    and let go after it (release); a backward pass fills them again rather than keep every expert's matrices
    (ExpertProduct)."""

    def __init__(self, experts: torch.nn.Module):
        self.experts = experts
        self.replaced: dict[int, Callable[[str, torch.Tensor], None]] = {}
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, e: int, name: str) -> torch.Tensor:
        """Expert ``e``'s ``name`` ("gate_up_proj" or "down_proj") matrix in float32."""
        stored = getattr(self.experts, name)[e]
        if e not in self.replaced and stored.dtype == torch.float32:
            return stored
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.empty(stored.shape, dtype=torch.float32, device=stored.device)
        if e in self.replaced:
            self.replaced[e](name, buf)
        else:
            buf.copy_(stored)  # (into a buffer: 4× faster than .float(), whose fresh pages each fault in)
        return buf

    def release(self) -> None:
        """Let the buffers go (0.7 GB at Mixtral-8x7B's shape: not to be held while GPTQ works)."""
        self._buffers.clear()


class ExpertProduct(torch.autograd.Function):
    """``x @ matrices(e, name).T`` whose backward asks ``matrices`` for the matrix again instead of keeping it
    (its buffer is reused by the next expert): what lets the importance pass's reverse pass carry gradients
    through a layer whose experts stay bf16. The weights take no gradient; the input's is ``grad @ W``, the same
    bits as grouped_mm's backward (tests/test_scale.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, matrices: ExpertMatrices, e: int, name: str) -> torch.Tensor:
        ctx.matrices, ctx.e, ctx.name = matrices, e, name
        return x @ matrices(e, name).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.matrices(ctx.e, ctx.name), None, None, None


def experts_one_at_a_time(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``grouped_mm`` experts forward (the implementation every pass runs otherwise), computed one
    expert at a time on the matrices ``experts.matrices`` (ExpertMatrices) gives: the same products in the same
    order — the CPU grouped_mm multiplies each expert's sorted tokens by that expert's matrix alone — so the same
    bits (tests/test_scale.py), without a layer's experts all in float32 at once; with autograd, the input's
    gradient too (ExpertProduct)."""
    matrices = experts.matrices
    k = top_k_index.shape[-1]
    ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states.index_select(0, perm // k)  # (its backward, index_add_, is deterministic on 2 threads)
    ends = list(accumulate(torch.bincount(ids, minlength=experts.num_experts).tolist()))
    bounds = [(e, a, b) for e, (a, b) in enumerate(zip([0, *ends[:-1]], ends, strict=True)) if b > a]

    def linear(inp: torch.Tensor, name: str) -> torch.Tensor:
        if torch.is_grad_enabled() and bounds:
            # split / cat: one backward op each for all experts. (A slice per expert written into a buffer costs
            # a backward op per expert over the whole buffer: with 128 experts the reverse pass's backward took
            # 7.6× its forward at Qwen3-30B-A3B's shape, 2.4× this way; the same bits.)
            parts = torch.split(inp, [b - a for _, a, b in bounds])
            return torch.cat([ExpertProduct.apply(p, matrices, e, name)
                              for (e, _, _), p in zip(bounds, parts, strict=True)])
        out = inp.new_empty(inp.shape[0], getattr(experts, name).shape[1])
        for e, a, b in bounds:
            out[a:b] = ExpertProduct.apply(inp[a:b], matrices, e, name)
        return out

    h = experts._apply_gate(linear(x, "gate_up_proj"))
    y = linear(h, "down_proj") * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    if not torch.is_grad_enabled():  # (a backward pass will fill them again: kept until a forward without one)
        matrices.release()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    return y[inv].view(hidden_states.shape[0], k, -1).sum(dim=1).to(hidden_states.dtype)


EXPERTS_ONE_AT_A_TIME = "mcsharp_one_expert_at_a_time"


class _StopForward(Exception):
    """Raised by a hook of LayerStream.partial_runner to end a layer's forward where its caller needs no more."""


@dataclass
class LayerStream:
    """A transformers model skeleton whose decoder layers are materialised one at a time.

    With ``experts_as_stored`` a layer's routed experts stay in the checkpoint's dtype and its forward (and
    backward) widens one expert at a time (ExpertMatrices, experts_one_at_a_time): the importance and GPTQ passes
    on the CPU, whose peak is the layer itself."""

    model_dir: Path
    config: object
    model: torch.nn.Module  # on the meta device, except what we materialise
    arch: object  # converters.base.MoeArchitecture
    tensors: SafetensorsIndex
    device: torch.device = torch.device("cpu")  # where layers, hidden states and every pass's tensors live
    experts_as_stored: bool = False

    @classmethod
    def open(cls, model_dir: str | Path, device: torch.device | str = "cpu", experts_as_stored: bool = False
             ) -> LayerStream:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        model_dir = Path(model_dir)
        cfg_json = json.loads((model_dir / "config.json").read_text())
        arch = get_architecture(cfg_json["architectures"][0])
        if arch is None:
            raise McsharpError(f"{model_dir}: {cfg_json['architectures'][0]} has no MoE adapter; supported: "
                               f"{', '.join(supported_architectures())}")
        config = AutoConfig.from_pretrained(model_dir)
        config._attn_implementation = "sdpa"  # causal masking without building a mask
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if experts_as_stored:  # (transformers' extension point for experts forwards)
            ALL_EXPERTS_FUNCTIONS.register(EXPERTS_ONE_AT_A_TIME, experts_one_at_a_time)
            model.set_experts_implementation(EXPERTS_ONE_AT_A_TIME)
        return cls(model_dir, config, model, arch, SafetensorsIndex(model_dir, device), torch.device(device),
                   experts_as_stored)

    @property
    def n_layer(self) -> int:
        return len(self.model.model.layers)

    @property
    def n_expert(self) -> int:
        c = self.config
        return int(getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
                   or c.n_routed_experts)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.tensors["model.embed_tokens.weight"]
        return torch.nn.functional.embedding(ids.to(w.device), w)

    def rotary(self, seq_len: int):
        rot = type(self.model.model.rotary_emb)(config=self.config)  # rebuilt on CPU (skeleton is meta)
        pos = torch.arange(seq_len)[None]
        emb = rot(torch.zeros(1, dtype=torch.float32), pos)  # (cos, sin), or one tensor (e.g. DeepSeek-V2's)
        emb = tuple(t.to(self.device) for t in emb) if isinstance(emb, tuple) else emb.to(self.device)
        return pos.to(self.device), emb

    def load_layer(self, i: int) -> torch.nn.Module:
        """Materialise decoder layer ``i`` with its checkpoint weights (float32) on the stream's device."""
        release_free_memory()  # what the work since the last layer freed, before the largest allocation
        layer = self.model.model.layers[i]
        layer.to_empty(device=self.device)
        names = self.tensors.names
        if self.experts_as_stored:
            names = {k: partial(f, widen=False) for k, f in names.items()}
        experts = f"{self.arch.moe_block}.{self.arch.experts}."
        sd = {k: v.to(self.device) if k.startswith(experts) else v.to(self.device, torch.float32)
              for k, v in self.arch.layer_state_dict(names, i, self.n_expert).items()}
        # assign: the module takes the loaded tensors as they are (a copy into to_empty's storage would hold the
        # layer twice)
        missing, unexpected = layer.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise McsharpError(f"{self.model_dir}: layer {i} does not match {self.arch.name}'s layout "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-save the checkpoint")
        if self.experts_as_stored and (block := self.moe_block(layer)) is not None:
            experts = getattr(block, self.arch.experts)
            if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) \
                    or not getattr(experts, "has_gate", True):  # (what experts_one_at_a_time computes)
                raise McsharpError(f"internal: {type(experts).__name__} is not a gated, bias-free experts layout")
            experts.matrices = ExpertMatrices(experts)
        return layer.eval()

    def unload_layer(self, i: int) -> None:
        layer = self.model.model.layers[i]
        if (block := self.moe_block(layer)) is not None:
            getattr(block, self.arch.experts).__dict__.pop("matrices", None)  # (its buffers, its replacements)
        layer.to("meta")
        release_free_memory()

    def release_expert_buffers(self, layer: torch.nn.Module) -> None:
        """Let go of the float32 buffers a layer's experts were widened into (ExpertMatrices.release), after a
        pass with gradients, which keeps them from one backward to the next."""
        if (block := self.moe_block(layer)) is not None and \
                (matrices := getattr(block, self.arch.experts).__dict__.get("matrices")) is not None:
            matrices.release()

    def moe_block(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        block = getattr(layer, self.arch.moe_block, None)
        return block if block is not None and hasattr(block, self.arch.experts) else None

    def sweep(self, token_ids: torch.Tensor, step: LayerStep, desc: str, progress: bool = True) -> torch.Tensor:
        """The one layer loop every forward pass runs (GPTQ, OTP capture, the importance pass's input spill,
        perturbation probes) on the embedded ``token_ids``: each decoder layer is materialised once,
        ``step(i, layer, run, hidden)`` does the pass's work on it and returns the next layer's input; one progress
        bar (``desc``) counts the layers. Returns the last layer's output. Only the current layer's input is held:
        the embedding is made here, so no caller keeps it for the whole sweep (0.27 GB at Mixtral-8x7B's width and
        16k tokens)."""
        from tqdm import tqdm

        hidden = self.embed(token_ids)
        for i, layer, run in tqdm(self.layers(hidden.shape[1]), total=self.n_layer, desc=desc, unit="layer",
                                  disable=not progress):
            hidden = step(i, layer, run, hidden)
        return hidden

    def layers(self, seq_len: int) -> Iterator[tuple[int, torch.nn.Module, Callable]]:
        """Yield (i, layer, run) for each decoder layer; ``run(hidden) -> hidden`` runs it on all sequences of
        ``seq_len`` tokens."""
        for i in range(self.n_layer):
            layer = self.load_layer(i)
            yield i, layer, self.runner(layer, seq_len)
            self.unload_layer(i)

    def runner(self, layer: torch.nn.Module, seq_len: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``run(hidden) -> hidden``: ``layer`` over every sequence of ``hidden`` (n_seq, seq_len, d), no grad."""
        pos, rope = self.rotary(seq_len)

        def run(h: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([layer(h[s:s + 1], position_ids=pos, position_embeddings=rope)
                                  for s in range(h.shape[0])])

        return run

    def attention_runner(self, layer: torch.nn.Module, seq_len: int) -> Callable[[torch.Tensor], None]:
        """``run(hidden)``: ``layer`` over every sequence of ``hidden``, each only until its attention has run
        (what hooks on the attention's linears need: the FFN side, most of a MoE layer's forward, is skipped);
        no output, no grad."""
        return self.partial_runner(layer, seq_len, layer.self_attn, after=True)

    def routing_runner(self, layer: torch.nn.Module, seq_len: int) -> Callable[[torch.Tensor], None]:
        """``run(hidden)``: ``layer`` over every sequence of ``hidden``, each only until its routed experts would
        run: what a MoeRecorder without outputs records (the block's inputs and every token's routing) without
        the experts' products, two thirds of a Qwen3-30B-A3B layer's forward; no output, no grad."""
        return self.partial_runner(layer, seq_len, getattr(self.moe_block(layer), self.arch.experts), after=False)

    def partial_runner(self, layer: torch.nn.Module, seq_len: int, stop_at: torch.nn.Module, after: bool
                       ) -> Callable[[torch.Tensor], None]:
        """``run(hidden)``: ``layer`` over every sequence of ``hidden``, each ended when ``stop_at`` (a module of
        the layer) is called (``after``: once it has run); hooks registered on the layer's modules before see
        what ran up to there. No output, no grad."""
        pos, rope = self.rotary(seq_len)

        def stop(*_):
            raise _StopForward

        def run(h: torch.Tensor) -> None:
            hook = stop_at.register_forward_hook(stop) if after else stop_at.register_forward_pre_hook(stop)
            try:
                with torch.no_grad():
                    for s in range(h.shape[0]):
                        try:
                            layer(h[s:s + 1], position_ids=pos, position_embeddings=rope)
                        except _StopForward:
                            pass
            finally:
                hook.remove()

        return run

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm applied to the last hidden states (the LM head's input)."""
        with torch.no_grad():
            return self.final_norm_module()(hidden)

    def final_norm_module(self) -> torch.nn.Module:
        """The model's final norm with its checkpoint weight, on the stream's device (no gradient)."""
        norm = type(self.model.model.norm)(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = self.tensors["model.norm.weight"].to(self.device)
        norm.weight.requires_grad_(False)
        return norm

    def lm_head_name(self) -> str:
        """Checkpoint key of the LM head (the token embedding when they are tied)."""
        return "lm_head.weight" if "lm_head.weight" in self.tensors.names else "model.embed_tokens.weight"

    def lm_head(self) -> torch.Tensor:
        return self.tensors[self.lm_head_name()].float().to(self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the last hidden states."""
        return self.final_norm(hidden) @ self.lm_head().T


@dataclass
class ExpertStats:
    """Per-expert routing statistics of one MoE layer over the calibration tokens."""

    freq: np.ndarray  # (n_expert,) number of (token, slot) selections
    weight_mass: np.ndarray  # (n_expert,) summed softmax routing probability of the selecting tokens
    n_tokens: int
    top_k: int

    def normalised(self) -> tuple[np.ndarray, np.ndarray]:
        """(phi, w) each summing to 1 within the layer (MC's normalisation)."""
        f = self.freq / max(self.freq.sum(), 1)
        w = self.weight_mass / max(self.weight_mass.sum(), 1e-30)
        return f, w


@dataclass
class MoeCapture:
    """What one MoE block saw: its inputs, its output, and the routing of every token."""

    x: torch.Tensor  # (tokens, d) MoE block input
    y: torch.Tensor | None  # (tokens, d) MoE block output (routed + shared; None: not recorded)
    router_logits: torch.Tensor  # (tokens, n_expert)
    top_k_index: torch.Tensor  # (tokens, k)
    top_k_weights: torch.Tensor  # (tokens, k)
    stats: ExpertStats = field(repr=False, default=None)


class MoeRecorder:
    """Hooks on an MoE block, while entered, that record what it sees in every forward (autograd's included):
    its inputs and (with ``outputs``) outputs and every token's routing; ``capture`` assembles them (all tokens,
    in order)."""

    def __init__(self, block: torch.nn.Module, arch, outputs: bool = True):
        self.block, self.arch, self.outputs = block, arch, outputs
        self.xs, self.ys, self.logits, self.idx, self.wts = [], [], [], [], []
        self._hooks = []

    def __enter__(self) -> MoeRecorder:
        def pre_block(mod, args):
            self.xs.append(args[0].reshape(-1, args[0].shape[-1]).detach())

        def post_block(mod, args, out):
            out = out[0] if isinstance(out, tuple) else out
            self.ys.append(out.reshape(-1, out.shape[-1]).detach())

        def post_router(mod, args, out):
            self.logits.append((out[0] if isinstance(out, tuple) else out).detach().float())

        def pre_experts(mod, args):
            self.idx.append(args[1].detach())
            self.wts.append(args[2].detach().float())

        router, experts = getattr(self.block, self.arch.router), getattr(self.block, self.arch.experts)
        self._hooks = [self.block.register_forward_pre_hook(pre_block),
                       router.register_forward_hook(post_router), experts.register_forward_pre_hook(pre_experts)]
        if self.outputs:
            self._hooks.append(self.block.register_forward_hook(post_block))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()

    def capture(self, n_expert: int) -> MoeCapture:
        """What the block saw over every forward recorded, with its routing statistics (the recorded pieces are
        let go: not held twice)."""
        cap = MoeCapture(torch.cat(self.xs), torch.cat(self.ys) if self.outputs else None, torch.cat(self.logits),
                         torch.cat(self.idx), torch.cat(self.wts))
        self.xs, self.ys, self.logits, self.idx, self.wts = [], [], [], [], []
        probs = torch.softmax(cap.router_logits, dim=-1)
        freq = torch.bincount(cap.top_k_index.flatten(), minlength=n_expert).cpu().numpy().astype(np.float64)
        mass = torch.zeros(n_expert, dtype=torch.float64, device=probs.device)
        mass.index_add_(0, cap.top_k_index.flatten(), probs.gather(1, cap.top_k_index).flatten().double())
        cap.stats = ExpertStats(freq=freq, weight_mass=mass.cpu().numpy(), n_tokens=int(cap.x.shape[0]),
                                top_k=int(cap.top_k_index.shape[1]))
        return cap


def capture_moe(block: torch.nn.Module, arch, n_expert: int, run: Callable[[torch.Tensor], torch.Tensor],
                hidden: torch.Tensor) -> tuple[MoeCapture, torch.Tensor]:
    """Run ``run(hidden)`` with hooks on ``block``; return what the block saw (all tokens) and run's output."""
    with MoeRecorder(block, arch) as rec:
        out = run(hidden)
    return rec.capture(n_expert), out


def dense_linears(layer: torch.nn.Module, arch) -> dict[str, tuple[str, torch.nn.Linear]]:
    """The quantisable linears of a decoder layer outside the routed experts: local name → (class, module).

    The router, tiny gates (e.g. Qwen2-MoE's 1-row shared-expert gate) and anything inside the expert container
    stay unquantised; ``self_attn.*`` is "attn", the rest (shared experts, dense MLPs) "ffn".
    """
    skip = (f"{arch.moe_block}.{arch.router}", f"{arch.moe_block}.{arch.experts}")
    out = {}
    for name, mod in layer.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if mod.out_features < MIN_ROWS:
            continue
        out[name] = ("attn" if name.startswith("self_attn.") else "ffn", mod)
    return out
