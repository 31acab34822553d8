"""What one collective costs between two local ranks on gloo, against the socket underneath.

The tensor-parallel demo's ratio at M = 1 is bound by the time its collectives take (5 a
forward for weight-only models, 9 with activation quantization). This script measures, between
two processes on this machine:

  1. gloo's all_gather, all_reduce and barrier (a FileStore: no port) of the demo's sizes,
     16 KiB (one row of hidden 4096 in fp32) and 1 MiB (64 rows), right after a barrier and
     right after 10 ms of matrix work on both ranks (as in a forward);
  2. the same bytes sent one way and back over one TCP socket between the same two processes
     (loopback, TCP_NODELAY, blocking calls in the calling thread; the two directions one
     after the other, so an upper bound of an exchange): what the transport costs without
     gloo's threads.

    python benchmarks/collective_latency.py [--reps 300]

Medians of --reps calls, in microseconds (rank 0's). The machine should be otherwise idle.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = {"16 KiB": 4096, "1 MiB": 262144}  # fp32 elements


def _median_us(fn, reps, before=None) -> float:
    for _ in range(10):
        fn()
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def _gloo(rank, path, reps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    a = torch.randn(512, 1024)

    def work_10ms():  # both ranks busy, as between two collectives of a forward
        dist.barrier()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.01:
            a[:64] @ a.t()

    res = {}
    for label, n in SIZES.items():
        x = torch.zeros(n)  # all_reduce runs in place: zeros stay zeros
        parts = [torch.empty(n) for _ in range(2)]
        for name, fn in (("all_gather", lambda: dist.all_gather(parts, x)),
                         ("all_reduce", lambda: dist.all_reduce(x))):
            res[f"gloo {name}", label, "after a barrier"] = _median_us(fn, reps, dist.barrier)
            res[f"gloo {name}", label, "after 10 ms of work"] = _median_us(
                fn, max(reps // 10, 10), work_10ms)
    res["gloo barrier", "", "after a barrier"] = _median_us(dist.barrier, reps, dist.barrier)
    if rank == 0:
        out.put(res)
    dist.destroy_process_group()


def _tcp(rank, port_q, reps, out):
    if rank == 0:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
    else:
        conn = socket.create_connection(("127.0.0.1", port_q.get()))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    res = {}
    for label, n in SIZES.items():
        data, buf = b"\0" * (4 * n), bytearray(4 * n)
        view = memoryview(buf)

        def receive():
            got = 0
            while got < len(buf):
                got += conn.recv_into(view[got:])

        def round_trip():  # rank 0 sends, rank 1 answers: an all_gather's bytes, one way a time
            if rank == 0:
                conn.sendall(data)
                receive()
            else:
                receive()
                conn.sendall(data)

        res["TCP round trip", label, "idle"] = _median_us(round_trip, reps)
    conn.close()
    if rank == 0:
        out.put(res)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=300)
    a = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for target, arg in ((_gloo, os.path.join(d, "store")), (_tcp, ctx.Queue())):
            procs = [ctx.Process(target=target, args=(r, arg, a.reps, out)) for r in range(2)]
            for pr in procs:
                pr.start()
            results.update(out.get(timeout=600))
            for pr in procs:
                pr.join()
    print(f"{'':<16} {'size':>7} {'when':<21} {'median us':>10}")
    for (what, size, when), us in results.items():
        print(f"{what:<16} {size:>7} {when:<21} {us:>10.1f}")
    # how many times the socket's cost one collective is, same size, both ranks ready
    for label in SIZES:
        tcp = results["TCP round trip", label, "idle"]
        gloo = results["gloo all_gather", label, "after a barrier"]
        print(f"gloo all_gather / TCP round trip, {label}: {gloo / tcp:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
