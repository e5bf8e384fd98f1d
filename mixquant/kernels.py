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


def _chunked_class(base):
    """A subclass of mlx-lm's GatedDeltaNet (`base`) whose prompt pass uses chunked_gated_delta; single
    tokens, masked batches and sharded layers go to mlx-lm's own code."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.gated_delta import compute_g, normalize_qk

    class ChunkedGatedDeltaNet(base):
        def __call__(self, inputs, mask=None, cache=None):
            B, S, _ = inputs.shape
            if S == 1 or mask is not None or self.sharding_group is not None:
                return super().__call__(inputs, mask, cache)
            qkv = self.in_proj_qkv(inputs)
            z = self.in_proj_z(inputs).reshape(B, S, self.num_v_heads, self.head_v_dim)
            b, a = self.in_proj_b(inputs), self.in_proj_a(inputs)
            conv_state = cache[0] if cache is not None and cache[0] is not None else mx.zeros(
                (B, self.conv_kernel_size - 1, self.conv_dim), dtype=inputs.dtype)
            conv_input = mx.concatenate([conv_state, qkv], axis=1)
            if cache is not None:
                cache[0] = mx.contiguous(conv_input[:, -(self.conv_kernel_size - 1):, :])
            conv_out = nn.silu(self.conv1d(conv_input))
            q, k, v = [t.reshape(B, S, h, d) for t, h, d in zip(
                mx.split(conv_out, [self.key_dim, 2 * self.key_dim], -1),
                [self.num_k_heads, self.num_k_heads, self.num_v_heads],
                [self.head_k_dim, self.head_k_dim, self.head_v_dim])]
            q, k = normalize_qk(q, k, inv_scale=self.head_k_dim**-0.5, eps=1e-6)
            state = cache[1] if cache is not None else None
            out, state = chunked_gated_delta(q, k, v, compute_g(self.A_log, a, self.dt_bias), mx.sigmoid(b), state)
            if cache is not None:
                cache[1] = state
                cache.advance(S)
            out = self.norm(out.astype(inputs.dtype), z)
            return self.out_proj(out.reshape(B, S, -1))

    return ChunkedGatedDeltaNet


def uses_token_loop() -> bool:
    """Whether mlx-lm would run the Gated DeltaNet recurrence token by token here."""
    import mlx.core as mx

    return mx.default_device() != mx.gpu or not mx.metal.is_available()


def chunk_prefill(model) -> int:
    """Give every mlx-lm Gated DeltaNet of `model` the chunked prompt pass (the module objects keep
    their parameters; they become instances of a subclass). Returns how many were changed."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.qwen3_5 import GatedDeltaNet

    swaps = []
    cls = _chunked_class(GatedDeltaNet)
    for path, module in model.named_modules():
        if type(module) is GatedDeltaNet:
            new = cls.__new__(cls)
            dict.update(new, module)
            new.__dict__.update(module.__dict__)
            swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
