"""Distributed checks run under torchrun by tests/test_distributed.py.

    torchrun --standalone --nproc-per-node 4 tests/dist_worker.py OUT.json

with DALLE_GPUS_PER_NODE=2: a 2 x 2 mesh. Rank 0 writes what it measured to
OUT.json; every check raises on failure (torchrun then exits non-zero).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.distributed.mesh import (  # noqa: E402
    ParallelConfig,
    build_mesh,
    data_parallel_replicas,
    init_distributed,
)
from dalle_core.distributed.powersgd import (  # noqa: E402
    CrossNodeReducer,
    Piece,
    PowerSGDCompressor,
    orthogonalize_gram_schmidt,
    orthogonalize_householder,
)
from dalle_core.precision import PerResblockGradScaler, apply_per_resblock_grad_scaling  # noqa: E402


# --- the per-resblock scaler on any number of ranks (imported by the tests for 1 process) ---

class _Res(nn.Module):
    """x + factor * fp16 linear(x): with factor 2^12 the fp16 backward overflows at 2^13."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.factor = 1.0

    def branch(self, x):
        return F.linear(x.half(), self.w.half()).float() * self.factor

    def forward(self, x):
        return x + self.branch(x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.res = _Res()

    def forward(self, x):
        return self.res(x)


class _Toy(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


SPIKES = {0: {3, 4, 60, 128, 129, 200}, 1: {128}}


def scaler_trajectory(n_data_parallel: int, n_updates: int = 240) -> dict:
    """Every rank sees the same data (so its local-mean gradient is the global
    one) and averages its gradients over the ranks, as data parallelism does;
    blocks overflow at the updates in SPIKES."""
    torch.manual_seed(0)
    model = _Toy(2)
    scaler = PerResblockGradScaler(2, n_data_parallel=n_data_parallel)
    apply_per_resblock_grad_scaling(model, scaler, resblock_names=("res",))
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    world = dist.get_world_size() if dist.is_initialized() else 1
    flags, mults, scales = [], [], []
    for u in range(n_updates):
        for i, b in enumerate(model.blocks):
            b.res.resblock.factor = 2.0**12 if u in SPIKES[i] else 1.0
        model.zero_grad(set_to_none=True)
        ((model(x) * c).sum() / 64).backward()
        for p in model.parameters():
            if world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world
        flags.append(scaler.unscale_())
        scaler.update()
        mults.append(scaler.multipliers)
        scales.append(scaler.scales)
    return {"flags": flags, "multipliers": mults, "scales": scales, "last_division": scaler.last_division,
            "n_divisions": scaler.n_divisions}


class _FakeScaler:
    """What the reducer asks a PerResblockGradScaler: one block, multiplier c."""

    def __init__(self, params, c):
        self.n, self.params, self.c, self.enabled = 1, list(params), c, True

    def block_parameters(self, i):
        return self.params

    def grad_multiplier(self, i):
        return self.c


class ByteCounter:
    """Wraps torch.distributed.all_reduce: the bytes handed to it per process group."""

    def __init__(self):
        self.orig = dist.all_reduce
        self.by_group: dict = {}

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            key = id(group)
            self.by_group[key] = self.by_group.get(key, 0) + tensor.numel() * tensor.element_size()
            return self.orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.orig

    def sent(self, group) -> int:
        return self.by_group.get(id(group), 0)


def local_tensors(seed: int, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def main() -> None:
    out_path = Path(sys.argv[1])
    info = init_distributed()
    rank, world = info.rank, info.world_size
    mesh = build_mesh()  # 2 x 2 from DALLE_GPUS_PER_NODE
    results: dict = {"world_size": world, "mesh_shape": list(mesh.shape)}

    # --- the mesh: node groups join the same GPU index across machines ------------
    node_ranks = dist.get_process_group_ranks(mesh["node"].get_group())
    gpu_ranks = dist.get_process_group_ranks(mesh["gpu"].get_group())
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "node": node_ranks, "gpu": gpu_ranks})
    results["groups"] = gathered
    node_group = mesh["node"].get_group()
    n = dist.get_world_size(node_group)
    node_index = node_ranks.index(rank)

    shapes = [(12, 10), (7,), (16, 3), (20, 24)]

    def truth(step: int):
        """Each machine's tensors and their mean over the machines."""
        per_node = [local_tensors(1000 * step + 10 * i + gpu_ranks.index(rank), shapes) for i in range(n)]
        mean = [sum(ts[j] for ts in per_node) / n for j in range(len(shapes))]
        return per_node[node_index], mean

    # --- 1. uncompressed reducer = exact mean -----------------------------------
    plain = CrossNodeReducer(node_group)
    mine, mean = truth(0)
    ts = [t.clone() for t in mine]
    plain.all_reduce_("u", ts)
    results["plain_max_err"] = max(float((a - b).abs().max()) for a, b in zip(ts, mean))
    assert results["plain_max_err"] < 1e-12, results["plain_max_err"]
    assert plain.compression_ratio == 1.0

    # --- 2. PowerSGD at rank >= rows reproduces the mean exactly (P is a square
    # orthonormal matrix, P P^T = I) ---------------------------------------------------
    wide = [(3, 10), (7,), (5, 24)]
    per_node = [local_tensors(77 + 10 * i + gpu_ranks.index(rank), wide) for i in range(n)]
    wide_mean = [sum(ts[j] for ts in per_node) / n for j in range(len(wide))]
    full = PowerSGDCompressor(64, node_group, min_compression_rate=0.0, use_error_feedback=False)
    ts = [t.clone() for t in per_node[node_index]]
    full.all_reduce_("w", ts)
    assert set(full.qs) == {"w/t0", "w/t2"}  # both matrices went through the low-rank path
    results["fullrank_max_err"] = max(float((a - b).abs().max()) for a, b in zip(ts, wide_mean))
    assert results["fullrank_max_err"] < 1e-9, results["fullrank_max_err"]

    # --- 3. error feedback: sum of outputs = sum of true means - mean final error ---
    for orth in ("gram_schmidt", "householder", "paper"):
        if orth == "paper":  # fixed Gaussian Q, no warm start, Householder of P + eps I
            c = PowerSGDCompressor(1, node_group, min_compression_rate=1.0, variant="paper", seed=3,
                                   orthogonalization_epsilon=1e-8)
        else:
            c = PowerSGDCompressor(1, node_group, min_compression_rate=1.0, orthogonalization=orth, seed=3)
        sum_out = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        sum_true = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        for step in range(6):
            mine, mean = truth(step + 1)
            ts = [t.clone() for t in mine]
            c.all_reduce_("u", ts, names=["a", "b", "c", "d"])
            c.end_step()
            for j in range(len(shapes)):
                sum_out[j] += ts[j]
                sum_true[j] += mean[j]
        # mean over machines of the final error buffers (zero for uncompressed tensors)
        errs = []
        for j, name in enumerate(["a", "b", "c", "d"]):
            e = c.errors.get(f"u/{name}")
            e = torch.zeros(shapes[j], dtype=torch.float64) if e is None else e.reshape(shapes[j]).clone()
            dist.all_reduce(e, group=node_group)
            errs.append(e / n)
        gap = max(float((so + e - st).abs().max()) for so, e, st in zip(sum_out, errs, sum_true))
        results[f"telescoping_gap_{orth}"] = gap
        assert gap < 1e-9, (orth, gap)
        # the compressed matrices really were low-rank this time
        assert "u/a" in c.errors and "u/b" not in c.errors
        # bytes: (a) 12x10 at rank 1 -> 22, (b) 7 plain, (c) 16x3 -> 19, (d) 20x24 -> 44 per step, fp64
        per_step_sent = (22 + 7 + 19 + 44) * 8
        per_step_plain = (120 + 7 + 48 + 480) * 8
        assert c.bytes_sent == 6 * per_step_sent, (c.bytes_sent, per_step_sent)
        assert c.bytes_uncompressed == 6 * per_step_plain
        results[f"ratio_{orth}"] = c.compression_ratio
        if orth == "paper":  # the same Q every step, never warm-started
            assert not c.qs and set(c._q0) == {"u/a", "u/c", "u/d"}
            q_first = {k: v.clone() for k, v in c._q0.items()}
            mine, _ = truth(99)
            c.all_reduce_("u", [t.clone() for t in mine], names=["a", "b", "c", "d"])
            assert all(torch.equal(q_first[k], c._q0[k]) for k in q_first)

    # --- 4. orthogonalisation -------------------------------------------------------
    p = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for fn in (orthogonalize_gram_schmidt, orthogonalize_householder):
        q = fn(p.clone())
        assert torch.allclose(q.t() @ q, torch.eye(5, dtype=torch.float64), atol=1e-10), fn.__name__
    z = torch.zeros(6, 2, dtype=torch.float64)
    assert torch.isfinite(orthogonalize_gram_schmidt(z)).all()
    # P + eps I: a zero P still gives orthonormal columns
    q = orthogonalize_householder(torch.zeros(6, 2, dtype=torch.float64), 1e-8)
    assert torch.allclose(q.t() @ q, torch.eye(2, dtype=torch.float64), atol=1e-10)

    # --- 5. a non-finite gradient on one machine: NaN out everywhere, errors reset ---
    c = PowerSGDCompressor(2, node_group, min_compression_rate=1.0)
    mine, _ = truth(50)
    ts = [t.clone() for t in mine]
    c.all_reduce_("u", ts, names=["a", "b", "c", "d"])  # seeds error buffers
    mine, _ = truth(51)
    ts = [t.clone() for t in mine]
    if node_index == 0:
        ts[3][2, 5] = float("inf")  # matrix "d" overflows on machine 0 only
    c.all_reduce_("u", ts, names=["a", "b", "c", "d"])
    assert torch.isnan(ts[3]).all(), "the overflowing matrix must come out non-finite on every machine"
    assert all(torch.isfinite(t).all() for t in ts[:3])
    assert "u/d" not in c.errors and "u/a" in c.errors
    assert c.n_nonfinite == 1
    results["nonfinite_ok"] = True

    # --- 6. state round trip ------------------------------------------------------------
    c2 = PowerSGDCompressor(2, node_group, min_compression_rate=1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.errors.keys() == c.errors.keys() and c2.qs.keys() == c.qs.keys()
    assert c2.bytes_sent == c.bytes_sent

    # --- 7. ParallelConfig / mesh agree -------------------------------------------------
    m2 = build_mesh(ParallelConfig(nodes=2, gpus_per_node=2))
    assert tuple(m2.shape) == (2, 2)
    assert data_parallel_replicas(m2) == 2  # machines, not ranks

    # --- 8. the error buffer stays in true units across a sqrt(2) back-off -------------
    # The hook sees gradients x c (the resblock's s / M); c drops by sqrt(2) between
    # the two steps. Reference: the same true gradients with no scale at all.
    name = "blocks.0.attn.attn.qkv.weight"
    shape = (20, 24)
    true = [local_tensors(500 + 10 * node_index + s + gpu_ranks.index(rank), [shape])[0] for s in range(2)]
    param = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    piece = Piece(name, 0, 480, shape, id(param))
    c0 = 2.0**13 * 2 ** (7 / 1000)
    runs = {}
    for label, cs, with_scaler in (("true", [1.0, 1.0], False), ("scaled", [c0, c0 / math.sqrt(2)], True),
                                   ("before_fix", [c0, c0 / math.sqrt(2)], False)):
        r = PowerSGDCompressor(2, node_group, min_compression_rate=1.0, variant="paper", seed=5)
        fake = _FakeScaler([param], cs[0])
        if with_scaler:
            r.set_grad_scaler(fake)
        outs, errs = [], []
        for step, c in enumerate(cs):
            fake.c = c
            flat = (true[step] * c).reshape(-1).clone()
            r.reduce_flat("u", flat, [piece])
            r.end_step()
            outs.append(flat.view(shape) / c)  # what unscale_ leaves: true units
            errs.append(r.errors["u/" + name].clone())
        runs[label] = (outs, errs)
    worst_err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(runs["scaled"][1], runs["true"][1]))
    worst_out = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(runs["scaled"][0], runs["true"][0]))
    assert worst_err < 1e-12 and worst_out < 1e-12, (worst_err, worst_out)
    # before the fix (error kept in the units of the step that made it): step 2's output is off
    before = runs["before_fix"][0][1]
    results["backoff_error_rel"] = worst_err
    results["backoff_output_rel_after_fix"] = worst_out
    results["backoff_output_rel_before_fix"] = float((before - runs["true"][0][1]).norm()
                                                     / runs["true"][0][1].norm())

    # --- 9. bytes measured at the collective, on the tiny prior under FSDP + hooks -------
    from dalle_core.distributed.parallelize import apply_cross_node_reduction, apply_fsdp
    from dalle_core.distributed.plan import plan
    from dalle_core.prior import DalleTransformer
    from dalle_core.profiles import get_profile

    tiny = get_profile("tiny").prior
    g = torch.Generator().manual_seed(rank)
    text = torch.randint(0, tiny.text_embedding_size, (2, tiny.text_len), generator=g)
    image = torch.randint(0, tiny.image_vocab_size, (2, tiny.image_len), generator=g)
    measured = {}
    for label, make in (("plain", lambda: CrossNodeReducer(node_group)),
                        ("excluded", lambda: PowerSGDCompressor(4, node_group, variant="paper")),
                        ("every_matrix", lambda: PowerSGDCompressor(4, node_group, variant="paper",
                                                                    exclude_roles=()))):
        torch.manual_seed(0)
        model = DalleTransformer(tiny)
        reducer = make()
        apply_cross_node_reduction(apply_fsdp(model, mesh), reducer)
        with ByteCounter() as bc:
            model.loss(text, image)["total"].backward()
        measured[label] = bc.sent(node_group)
        assert measured[label] == reducer.bytes_sent, (label, measured[label], reducer.bytes_sent)
    p_ex = plan(tiny, nodes=2, gpus_per_node=2, batch_size_per_gpu=2, powersgd_rank=4, grad_bytes=4)
    p_all = plan(tiny, nodes=2, gpus_per_node=2, batch_size_per_gpu=2, powersgd_rank=4, grad_bytes=4,
                 powersgd_exclude_roles=())
    # 2 machines: a ring all-reduce sends 2 (n - 1) / n = 1 x its payload
    assert measured["plain"] == p_ex.inter_bytes_uncompressed, (measured, p_ex.inter_bytes_uncompressed)
    assert measured["excluded"] == p_ex.inter_bytes_powersgd, (measured, p_ex.inter_bytes_powersgd)
    assert measured["every_matrix"] == p_all.inter_bytes_powersgd, (measured, p_all.inter_bytes_powersgd)
    results["measured_bytes"] = measured
    results["plan_bytes"] = {"plain": p_ex.inter_bytes_uncompressed, "excluded": p_ex.inter_bytes_powersgd,
                             "every_matrix": p_all.inter_bytes_powersgd}

    # --- 10. the scaler on 4 ranks: 2 x 2 mesh (M = 2) and 4 x 1 (M = 4) ------------------
    m41 = build_mesh(ParallelConfig(nodes=4, gpus_per_node=1))
    results["scaler"] = {str(M): scaler_trajectory(M) for M in (data_parallel_replicas(mesh),
                                                                 data_parallel_replicas(m41))}

    if rank == 0:
        out_path.write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
