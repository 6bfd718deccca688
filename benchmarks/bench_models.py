"""What the dimension measure gives at the monitor's defaults on real networks: ResNet-18 and MobileNetV3-small
(torchvision, CIFAR-size inputs), a small GPT (token and position embeddings, ``nn.TransformerEncoder`` with GELU and
LayerNorm), the same GPT with attention written with Linear layers, an LSTM classifier and a stacked
bidirectional GRU classifier.

For each model, in a fresh process (so that its high-water mark is its own), on synthetic inputs (a probe of
``--probe-size`` samples, 64 by default as in ``GeometryMonitor``), it runs
``batch_functional_dimension(model, x, spectrum=True, blocks="auto")`` — the monitor's defaults — and prints the
engine used, the dimension (exact engine) or numerical rank (float engines) against its bound, whether it is
saturated, the effective rank of the spectrum, the per-block numerical ranks (and exact ranks, exact engine), the
seconds of the point and the peak memory it added (``ru_maxrss`` after the measure minus before). A measure that
refuses (memory budget, no engine) prints its reason instead of numbers.

With ``--monitor-seconds S`` it also trains each model for about S seconds with ``GeometryMonitor()`` at its
defaults (Adam, batches of 32) and reads the TensorBoard events back: how many points each measure took, which
logged values are NaN, and the monitor's share of the wall time (its own account).

torchvision models run only where torchvision imports (the registry's torch build); the others need only torch.

Examples::

    python benchmarks/bench_models.py                           # every model, probe of 64
    python benchmarks/bench_models.py --models gpt lstm --probe-size 8
    python benchmarks/bench_models.py --monitor-seconds 120      # plus a 2-minute training run of each
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
from torch import nn

MODELS = ("resnet18", "mobilenet_v3_small", "gpt", "gpt_linear_attention", "lstm", "gru")
VOCAB, SEQ, WIDTH = 32, 16, 32


class GPT(nn.Module):
    """Token + position embeddings, a 2-layer pre-LN ``nn.TransformerEncoder`` (GELU, causal mask), LayerNorm and a
    vocabulary head: (N, SEQ) token ids → (N, SEQ, VOCAB) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        h = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device).expand(n, t))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True)))


class LinearAttentionBlock(nn.Module):
    """A pre-LN transformer block with its attention written with Linear projections (causal, 4 heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.up, self.act, self.down = nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(n, t, 3, 4, WIDTH // 4).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(n, t, WIDTH))
        return h + self.down(self.act(self.up(self.ln2(h))))


class LinearAttentionGPT(GPT):
    """The GPT above with :class:`LinearAttentionBlock` s instead of ``nn.TransformerEncoderLayer``: same sizes; both
    get the float Gram engine (``nn.MultiheadAttention`` through its own factor form)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([LinearAttentionBlock(), LinearAttentionBlock()])  # type: ignore[assignment]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        h = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device).expand(n, t))
        for block in self.encoder:
            h = block(h)
        return self.head(self.norm(h))


class LSTMClassifier(nn.Module):
    """The LSTM of ``bench_callback.py --model lstm``: (N, 20, 8) → one-layer LSTM (32) → Linear → 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, 32, batch_first=True), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])

class GRUClassifier(nn.Module):
    """(N, 20, 8) → a 2-layer bidirectional GRU (32 per direction) → the last step → Linear → 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def build(name: str, n: int, generator: torch.Generator) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (seeded), n synthetic inputs and targets."""
    torch.manual_seed(0)
    if name in ("resnet18", "mobilenet_v3_small"):
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=10)
        return model, torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    if name in ("gpt", "gpt_linear_attention"):
        model = GPT() if name == "gpt" else LinearAttentionGPT()
        ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=generator)
        return model, ids[:, :-1], ids[:, 1:]
    if name == "lstm":
        x = torch.randn(n, 20, 8, generator=generator)
        return LSTMClassifier(), x, (x[:, :, 0].sum(1) > 0).long() * 2 + (x[:, :, 1].sum(1) > 0).long()
    if name == "gru":
        x = torch.randn(n, 20, 8, generator=generator)
        return GRUClassifier(), x, (x[:, :, 0].sum(1) > 0).long() * 2 + (x[:, :, 1].sum(1) > 0).long()
    raise ValueError(f"unknown model {name!r}: choose from {MODELS}")


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(name: str, probe_size: int) -> dict[str, Any]:
    """The dimension at the monitor's defaults on one model (run in its own process)."""
    from lightning_geomdim import batch_functional_dimension

    model, x, _ = build(name, probe_size, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval()(x)
    model.train()
    before = rss()
    out: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()),
                           "threads": torch.get_num_threads()}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = batch_functional_dimension(model, x, spectrum=True, blocks="auto")
    except Exception as err:  # a refusal: report it
        out.update(seconds=time.perf_counter() - start, peak_added=rss() - before,
                   refused=f"{type(err).__name__}: {str(err)[:300]}")
        return out
    out.update(
        seconds=time.perf_counter() - start, peak_added=rss() - before, engine=res.engine, rank=res.rank,
        exact=res.exact, upper_bound=res.upper_bound, rows=res.num_rows, saturated=res.saturated,
        effective_rank=res.spectrum.effective_rank if res.spectrum else math.nan,
        numerical_rank=res.spectrum.numerical_rank if res.spectrum else None,
        blocks={k: [b.numerical_rank, b.bound, res.block_dimensions.get(k)] for k, b in res.blocks.items()},
        warnings=sorted({str(w.message)[:200] for w in caught}),
    )
    return out


def monitor_one(name: str, seconds: float) -> dict[str, Any]:
    """Train about ``seconds`` with GeometryMonitor() at its defaults; what it logged (run in its own process)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_geomdim import GeometryMonitor

    model, x, y = build(name, 512, torch.Generator().manual_seed(2))

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            out = self(batch[0])
            return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), batch[1].reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    monitor = GeometryMonitor()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_time={"seconds": seconds}, logger=TensorBoardLogger(tmp, name="tb"),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.callbacks.append(monitor)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            trainer.fit(Module(), DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
            wall = time.perf_counter() - start
        acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
        acc.Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.startswith("geometry/")]
        values = {t: [e.value for e in acc.Scalars(t)] for t in tags}
    points = {m: max((len(v) for t, v in values.items() if _measure(t) == m), default=0)
              for m in ("dimension", "flatness", "alignment")}
    account = monitor._time.state_dict()
    return {
        "model": name, "wall": wall, "steps": trainer.global_step, "points": points,
        "nan": sorted(t for t, v in values.items() if any(math.isnan(a) for a in v)),
        "monitor_seconds": account.get("measuring_s", math.nan),
        # the account: other seconds, each measure's seconds (stopped points included), the rest is shared
        "other_seconds": account.get("other_s", math.nan), "spent_seconds": account.get("spent_s", {}),
        "warnings": sorted({str(w.message)[:240] for w in caught if "GeometryMonitor" in str(w.message)}),
    }


def _measure(tag: str) -> str:
    part = tag.split("/")[1]
    return part if part in ("flatness", "alignment") else "dimension"


def run(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return {"model": args[1], "refused": f"process failed: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--probe-size", type=int, default=64)
    parser.add_argument("--monitor-seconds", type=float, default=0.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--monitor-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.probe_size)))
        return
    if args.monitor_one:
        print(json.dumps(monitor_one(args.monitor_one, args.monitor_seconds)))
        return
    try:
        import torchvision  # noqa: F401
    except Exception:
        skipped = [m for m in args.models if m in ("resnet18", "mobilenet_v3_small")]
        args.models = [m for m in args.models if m not in skipped]
        if skipped:
            print(f"torchvision does not import here: skipping {skipped}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, probe of {args.probe_size} samples")
    print("| model | P | engine | rank / bound (rows) | saturated | effective rank | per-block ranks (rank/bound) "
          "| s per point | peak added |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = run(["--one", name, "--probe-size", str(args.probe_size)])
        if "refused" in r:
            print(f"| {name} | {r.get('params', '')} | refused | {r['refused']} | | | | {r.get('seconds', 0):.1f} | "
                  f"{r.get('peak_added', 0) / 2**20:.0f} MiB |")
            continue
        what = "BFD" if r["exact"] else "numerical rank"
        blocks = ", ".join(f"{k} {v[0]}/{v[1]}" + (f" (exact {v[2]})" if v[2] is not None else "")
                           for k, v in r["blocks"].items()) or "none ≤ rows"
        print(f"| {name} | {r['params']:,} | {r['engine']} | {what} {r['rank']:,} / {r['upper_bound']:,} "
              f"({r['rows']:,}) | {r['saturated']} | {r['effective_rank']:.1f} | {blocks} | {r['seconds']:.1f} | "
              f"{r['peak_added'] / 2**20:.0f} MiB |")
    if args.monitor_seconds > 0:
        print(f"\nGeometryMonitor() at defaults, {args.monitor_seconds:g} s of training each:")
        for name in args.models:
            r = run(["--monitor-one", name, "--monitor-seconds", str(args.monitor_seconds)])
            if "refused" in r:
                print(f"- {name}: {r['refused']}")
                continue
            print(f"- {name}: {r['steps']} steps in {r['wall']:.0f} s, points {r['points']}, monitor "
                  f"{r['monitor_seconds']:.1f} s ({r['monitor_seconds'] / r['wall']:.1%} of the wall time), NaN keys: "
                  f"{r['nan'] or 'none'}")
            for w in r["warnings"]:
                print(f"    warning: {w}")


if __name__ == "__main__":
    main()
