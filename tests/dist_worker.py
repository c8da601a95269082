"""Distributed checks run under torchrun by tests/test_distributed.py.

    torchrun --standalone --nproc-per-node 4 tests/dist_worker.py OUT.json

with DALLE_GPUS_PER_NODE=2: a 2 x 2 mesh. Rank 0 writes what it measured to
OUT.json; every check raises on failure (torchrun then exits non-zero).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.distributed.mesh import ParallelConfig, build_mesh, init_distributed  # noqa: E402
from dalle_core.distributed.powersgd import (  # noqa: E402
    CrossNodeReducer,
    PowerSGDCompressor,
    orthogonalize_gram_schmidt,
    orthogonalize_householder,
)


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
    for orth in ("gram_schmidt", "householder"):
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

    # --- 4. orthogonalisation -------------------------------------------------------
    p = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for fn in (orthogonalize_gram_schmidt, orthogonalize_householder):
        q = fn(p.clone())
        assert torch.allclose(q.t() @ q, torch.eye(5, dtype=torch.float64), atol=1e-10), fn.__name__
    z = torch.zeros(6, 2, dtype=torch.float64)
    assert torch.isfinite(orthogonalize_gram_schmidt(z)).all()

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

    if rank == 0:
        out_path.write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
