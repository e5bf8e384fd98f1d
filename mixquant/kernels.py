"""A chunked (parallel) Gated DeltaNet for prompts, in MLX ops, for backends where mlx-lm runs the
recurrence one token at a time (CPU; CUDA; Metal while training).

The recurrence, per head: S_t = g_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, y_t = S_t q_t.
Within a chunk of C tokens, with gamma_t the decay from the chunk's start and S0 its entering state,
S_t = gamma_t S0 + sum_{s<=t} (gamma_t / gamma_s) u_s k_s^T where the pseudo-values U solve the
unit lower-triangular system (I + L) U = diag(b) (V - diag(gamma) K S0^T), L[t,s] = b_t
(gamma_t / gamma_s) k_t . k_s for s < t (the WY form of the delta rule). So, for all chunks at once:
T = (I + L)^-1 diag(b) (by repeated squaring: L is nilpotent), U~ = T V and W = T diag(gamma) K;
then, chunk after chunk, U = U~ - W S0^T, Y = diag(gamma) Q S0^T + M U with M[t,s] = (gamma_t /
gamma_s) q_t . k_s for s <= t, and the state moves on. Decay ratios are taken in log space.
"""

from __future__ import annotations

import functools

CHUNK = 16  # 64 loses float32 accuracy on trained weights (decays near 1, large betas); 16 keeps 1e-8


def chunked_gated_delta(q, k, v, g, beta, state=None, chunk: int = CHUNK):
    """q, k [B, T, Hk, Dk] (normalised as mlx-lm does), v [B, T, Hv, Dv], g (decay) and beta
    [B, T, Hv], state [B, Hv, Dv, Dk] or None -> (y [B, T, Hv, Dv], state), as
    mlx_lm.models.gated_delta.gated_delta_ops computes them, in float32."""
    import mlx.core as mx

    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if Hv // Hk > 1:
        q = mx.repeat(q, Hv // Hk, axis=-2)
        k = mx.repeat(k, Hv // Hk, axis=-2)
    pad = -T % chunk
    f32 = mx.float32
    q, k, v, g, beta = (a.astype(f32) for a in (q, k, v, g, beta))
    if pad:  # padded steps: no decay, no write, no read
        q, k, v = (mx.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (q, k, v))
        g = mx.pad(g, [(0, 0), (0, pad), (0, 0)], constant_values=1.0)
        beta = mx.pad(beta, [(0, 0), (0, pad), (0, 0)])
    n = (T + pad) // chunk

    def chunks(a):  # [B, T, H, D] -> [B, H, n, C, D]
        return mx.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 3, 1)

    q, k, v = chunks(q), chunks(k), chunks(v)  # [B, H, n, C, D]
    beta = chunks(beta[..., None])[..., 0]  # [B, H, n, C]
    lg = mx.cumsum(mx.log(chunks(g[..., None])[..., 0]), axis=-1)  # log decay from the chunk start
    idx = mx.arange(chunk)
    strict = idx[:, None] > idx[None, :]
    inclusive = idx[:, None] >= idx[None, :]
    diff = lg[..., :, None] - lg[..., None, :]  # log(gamma_t / gamma_s)
    decay_strict = mx.where(strict, mx.exp(mx.where(strict, diff, 0.0)), 0.0)
    decay_incl = mx.where(inclusive, mx.exp(mx.where(inclusive, diff, 0.0)), 0.0)
    kk = k @ k.swapaxes(-1, -2)
    lower = beta[..., :, None] * kk * decay_strict  # L, strictly lower triangular
    inverse = _unit_lower_inverse(lower, chunk)
    t_mat = inverse * beta[..., None, :]  # (I + L)^-1 diag(b)
    gamma = mx.exp(lg)
    u_tilde = t_mat @ v  # [B, H, n, C, Dv]
    w = t_mat @ (gamma[..., None] * k)  # [B, H, n, C, Dk]
    m = (q @ k.swapaxes(-1, -2)) * decay_incl
    qg = gamma[..., None] * q
    to_end = mx.exp(lg[..., -1:] - lg)  # gamma_C / gamma_s
    s = mx.zeros((B, Hv, Dv, Dk), f32) if state is None else state.astype(f32)
    ys = []
    for c in range(n):
        st = s.swapaxes(-1, -2)  # [B, H, Dk, Dv]
        u = u_tilde[:, :, c] - w[:, :, c] @ st
        ys.append(qg[:, :, c] @ st + m[:, :, c] @ u)
        s = gamma[:, :, c, -1][..., None, None] * s + (u.swapaxes(-1, -2) @ (to_end[:, :, c][..., None] * k[:, :, c]))
    y = mx.stack(ys, axis=2).reshape(B, Hv, n * chunk, Dv)[:, :, :T]
    return mx.moveaxis(y, 1, 2), s


def _unit_lower_inverse(lower, size: int):
    """(I + L)^-1 for strictly lower-triangular L (nilpotent): (I - L)(I + L^2)(I + L^4)..."""
    import mlx.core as mx

    eye = mx.eye(size, dtype=lower.dtype)
    result = eye - lower
    power = lower @ lower
    reach = 2
    while reach < size:
        result = result @ (eye + power)
        power = power @ power
        reach *= 2
    return result


class StepStates:
    """Marks a Gated DeltaNet layer's cache (mlx-lm's ArraysCache: conv state, recurrent state) whose
    next multi-token pass runs token by token, as decoding does, keeping the states after every
    position in `steps` so a caller can roll back to any of them (speculative verification)."""


@functools.cache
def step_states_cache(base):
    """A subclass of mlx-lm's ArraysCache (`base`) that is a StepStates: `record` asks the next pass
    to keep per-position states in `steps` [(conv state, recurrent state), ...]."""

    class RecordingArraysCache(base, StepStates):
        def __init__(self, size):
            super().__init__(size)
            self.record = False
            self.steps: list = []

        def rewind(self, position: int) -> None:
            """Back to the states after `position` of the last recorded pass."""
            self[0], self[1] = self.steps[position]
            self.steps = []

    return RecordingArraysCache


@functools.cache
def _kernel_class(base, chunked: bool):
    """A subclass of mlx-lm's GatedDeltaNet (`base`): prompts through chunked_gated_delta (when
    `chunked`), recorded passes token by token with every state kept; single tokens and sharded
    layers go to mlx-lm's own code. A batch's mask (padding, or the all-true mask of a cache merged
    by mlx-lm's BatchGenerator) is honoured as mlx-lm's recurrence honours it: a masked position's
    input is zero and it leaves the state as it was (decay 1, beta 0)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.gated_delta import compute_g, gated_delta_update, normalize_qk

    class GatedDeltaNetKernels(base):
        CHUNKED = chunked

        def __call__(self, inputs, mask=None, cache=None):
            S = inputs.shape[1]
            own = self.sharding_group is None
            plain = own and mask is None
            if plain and isinstance(cache, StepStates) and cache.record:
                return self._recorded(inputs, cache)
            if plain and S == 1 and self.CHUNKED and cache is not None:
                return self._recorded(inputs, cache, keep_steps=False)  # decoding: the compiled step
            if not own or S == 1 or not self.CHUNKED:
                return super().__call__(inputs, mask, cache)
            q, k, v, a, b, z, conv_input = self._project(inputs, cache, mask)
            g, beta = compute_g(self.A_log, a, self.dt_bias), mx.sigmoid(b)
            if mask is not None:
                g, beta = mx.where(mask[..., None], g, 1.0), mx.where(mask[..., None], beta, 0.0)
            state = cache[1] if cache is not None else None
            out, state = chunked_gated_delta(q, k, v, g, beta, state)
            if cache is not None:
                keep = self.conv_kernel_size - 1
                if cache.lengths is not None:  # right-padded: the state of each prompt's own end
                    ends = mx.clip(cache.lengths, 0, S)
                    cache[0] = mx.take_along_axis(conv_input, (ends[:, None] + mx.arange(keep))[..., None], axis=1)
                else:
                    cache[0] = mx.contiguous(conv_input[:, -keep:, :])
                cache[1] = state
                cache.advance(S)
            return self._output(out.astype(inputs.dtype), z)

        def _recorded(self, inputs, cache, keep_steps: bool = True):
            """Token by token, as decoding runs (where mlx-lm loops over tokens, through one compiled
            graph per length), keeping the states after every token in `cache.steps`."""
            S = inputs.shape[1]
            keep = self.conv_kernel_size - 1
            q, k, v, a, b, z, conv_input = self._project(inputs, cache)
            state = cache[1]
            if self.CHUNKED:
                if state is None:
                    state = mx.zeros((q.shape[0], self.num_v_heads, self.head_v_dim, self.head_k_dim), mx.float32)
                out, states = _token_loop(S, self.num_v_heads // self.num_k_heads)(
                    q, k, v, compute_g(self.A_log, a, self.dt_bias), mx.sigmoid(b), state)
            else:
                outs, states = [], []
                for t in range(S):
                    step = slice(t, t + 1)
                    o, state = gated_delta_update(q[:, step], k[:, step], v[:, step], a[:, step], b[:, step],
                                                  self.A_log, self.dt_bias, state, None, use_kernel=not self.training)
                    outs.append(o)
                    states.append(state)
                out = mx.concatenate(outs, axis=1)
            if keep_steps:
                cache.steps = [(mx.contiguous(conv_input[:, t + 1 : t + 1 + keep, :]), st)
                               for t, st in enumerate(states)]
            cache[0] = mx.contiguous(conv_input[:, -keep:, :])
            cache[1] = states[-1]
            cache.advance(S)
            return self._output(out, z)

        def _project(self, inputs, cache, mask=None):
            B, S, _ = inputs.shape
            qkv = self.in_proj_qkv(inputs)
            if mask is not None:
                qkv = mx.where(mask[..., None], qkv, 0)
            z = self.in_proj_z(inputs).reshape(B, S, self.num_v_heads, self.head_v_dim)
            b, a = self.in_proj_b(inputs), self.in_proj_a(inputs)
            conv_state = cache[0] if cache is not None and cache[0] is not None else mx.zeros(
                (B, self.conv_kernel_size - 1, self.conv_dim), dtype=inputs.dtype)
            conv_input = mx.concatenate([conv_state, qkv], axis=1)
            conv_out = nn.silu(self.conv1d(conv_input))
            q, k, v = [t.reshape(B, S, h, d) for t, h, d in zip(
                mx.split(conv_out, [self.key_dim, 2 * self.key_dim], -1),
                [self.num_k_heads, self.num_k_heads, self.num_v_heads],
                [self.head_k_dim, self.head_k_dim, self.head_v_dim])]
            q, k = normalize_qk(q, k, inv_scale=self.head_k_dim**-0.5, eps=1e-6)
            return q, k, v, a, b, z, conv_input

        def _output(self, out, z):
            B, S = out.shape[:2]
            return self.out_proj(self.norm(out, z).reshape(B, S, -1))

    return GatedDeltaNetKernels


@functools.cache
def _token_loop(n_tokens: int, repeat: int):
    """mlx-lm's recurrent step (its ops) over `n_tokens` tokens as one compiled graph: (q, k, v, g,
    beta, state) -> (y [B, T, Hv, Dv], the state after each token)."""
    import mlx.core as mx
    from mlx_lm.models.gated_delta import _gated_delta_step_ops

    def run(q, k, v, g, beta, state):
        if repeat > 1:
            q, k = mx.repeat(q, repeat, -2), mx.repeat(k, repeat, -2)
        ys, states = [], []
        for t in range(n_tokens):
            y, state = _gated_delta_step_ops(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
            ys.append(y)
            states.append(state)
        return mx.stack(ys, axis=1), states

    return mx.compile(run)


def uses_token_loop() -> bool:
    """Whether mlx-lm would run the Gated DeltaNet recurrence token by token here."""
    import mlx.core as mx

    return mx.default_device() != mx.gpu or not mx.metal.is_available()


def adopt_kernels(model, chunked: bool) -> int:
    """Give every mlx-lm Gated DeltaNet of `model` this module's passes (the module objects keep
    their parameters; they become instances of a subclass): recorded passes always, the chunked
    prompt pass when `chunked`. Layers that already have them are left as they are. Returns how
    many were changed."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.qwen3_5 import GatedDeltaNet

    swaps = []
    cls = _kernel_class(GatedDeltaNet, chunked)
    for path, module in model.named_modules():
        if type(module) is GatedDeltaNet:
            new = cls.__new__(cls)
            dict.update(new, module)
            new.__dict__.update(module.__dict__)
            swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def chunk_prefill(model) -> int:
    """adopt_kernels with the chunked prompt pass."""
    return adopt_kernels(model, chunked=True)


def recording_cache(model) -> list:
    """mlx-lm's prompt cache for `model` with every ArraysCache able to record per-position states."""
    from mlx_lm.models.cache import ArraysCache, make_prompt_cache

    cls = step_states_cache(ArraysCache)
    return [cls(len(c.cache)) if type(c) is ArraysCache else c for c in make_prompt_cache(model)]
