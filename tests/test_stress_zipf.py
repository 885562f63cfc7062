"""Codebook health under stress: 10 000 training steps of a VQEmbeddingBagCollection on a
skewed (Zipf) id stream, with and without dead-code restarts, plus quantizer-level variants
of every mode, and NaN/Inf reporting that names the table and the feature.

Every run is seeded and single-threaded (deterministic, and fast on a shared 2-core box).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import pytest
import torch
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor

from vq_torchrec import VQConfig
from vq_torchrec.modules import VQEmbeddingBagCollection, VQEmbeddingCollection, vq_loss, vq_stats
from vq_torchrec.quantization import ResidualVectorQuantizer, VectorQuantizer, build_quantizer

LOG = logging.getLogger("vq_torchrec.stress")

NUM_ITEMS = 1000
NUM_USERS = 100
DIM = 8
K = 16
BATCH = 8
MAX_HISTORY = 4
RESTART_EVERY = 100
ZIPF_EXPONENT = 1.2
FEATURES = ["item", "history", "user"]




def zipf_probs(n: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """``(n,)`` probabilities ``~ 1 / rank^exponent`` over a random permutation of the ids."""
    ranks = torch.randperm(n, generator=generator).double() + 1.0
    p = ranks.pow(-exponent)
    return p / p.sum()


@dataclass
class ZipfStream:
    """Pre-drawn KJT batches: ``item`` (one id per bag), ``history`` (0..MAX_HISTORY ids, so
    some bags are empty; duplicates are common), ``user`` (one id), all Zipf-distributed;
    binary labels are a fixed random function of the item id."""

    steps: int
    seed: int
    items: torch.Tensor = field(init=False)
    history: torch.Tensor = field(init=False)
    history_lengths: torch.Tensor = field(init=False)
    users: torch.Tensor = field(init=False)
    item_label: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        p_item = zipf_probs(NUM_ITEMS, ZIPF_EXPONENT, g)
        p_user = zipf_probs(NUM_USERS, ZIPF_EXPONENT, g)
        n = self.steps * BATCH
        self.items = torch.multinomial(p_item, n, replacement=True, generator=g).view(self.steps, BATCH)
        self.history_lengths = torch.randint(0, MAX_HISTORY + 1, (self.steps, BATCH), generator=g)
        total = int(self.history_lengths.sum())
        self.history = torch.multinomial(p_item, total, replacement=True, generator=g)
        self._history_offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.history_lengths.sum(1).cumsum(0)])
        self.users = torch.multinomial(p_user, n, replacement=True, generator=g).view(self.steps, BATCH)
        self.item_label = torch.randint(0, 2, (NUM_ITEMS,), generator=g).float()

    def batch(self, step: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        hist = self.history[self._history_offsets[step] : self._history_offsets[step + 1]]
        lengths = torch.cat(
            [torch.ones(BATCH, dtype=torch.long), self.history_lengths[step], torch.ones(BATCH, dtype=torch.long)]
        )
        values = torch.cat([self.items[step], hist, self.users[step]])
        kjt = KeyedJaggedTensor(keys=FEATURES, values=values, lengths=lengths)
        return kjt, self.item_label[self.items[step]]


def make_model(restart_every: int, seed: int = 0) -> tuple[VQEmbeddingBagCollection, torch.nn.Linear]:
    """Two quantized tables (``t_item`` serves item and history, ``t_user`` serves user).
    ``kmeans_init=False``: the N(0, 1) codebook is far from the tiny initial rows, so the
    codebook collapses onto a few codes unless dead codes are restarted."""
    torch.manual_seed(seed)
    tables = [
        EmbeddingBagConfig(name="t_item", embedding_dim=DIM, num_embeddings=NUM_ITEMS, feature_names=["item", "history"]),
        EmbeddingBagConfig(name="t_user", embedding_dim=DIM, num_embeddings=NUM_USERS, feature_names=["user"]),
    ]
    cfg = VQConfig(codebook_size=K, kmeans_init=False, restart_every=restart_every, update="ema")
    ebc = VQEmbeddingBagCollection(tables, cfg, validate_inputs=False)
    head = torch.nn.Linear(3 * DIM, 1)
    return ebc, head


def all_state_finite(ebc: VQEmbeddingBagCollection, head: torch.nn.Module) -> list[str]:
    """Names of every parameter / floating buffer (tables, codebooks, EMA stats) with NaN/Inf."""
    named = list(ebc.named_parameters()) + list(ebc.named_buffers()) + list(head.named_parameters())
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


@dataclass
class RunLog:
    stats: list[tuple[int, dict[str, dict[str, float]]]] = field(default_factory=list)
    restarts: list[tuple[int, str, float, float]] = field(default_factory=list)  # step, table, dead before, after
    losses_finite: bool = True
    outputs_finite: bool = True
    nonfinite_state: list[tuple[int, list[str]]] = field(default_factory=list)


def train(steps: int, restart_every: int, stream: ZipfStream, log_every: int = RESTART_EVERY) -> tuple[
    VQEmbeddingBagCollection, RunLog
]:
    """Train ``steps`` steps; every ``log_every`` steps log ``vq_stats`` and check all state.
    Around every restart step, record the dead-code count just before and just after."""
    ebc, head = make_model(restart_every)
    opt = torch.optim.Adagrad(list(ebc.parameters()) + list(head.parameters()), lr=0.05)
    log = RunLog()
    ok_out = torch.ones((), dtype=torch.bool)
    ok_loss = torch.ones((), dtype=torch.bool)
    before: dict[str, float] = {}
    for step in range(steps):
        kjt, labels = stream.batch(step)
        out = ebc(kjt).values()
        task = torch.nn.functional.binary_cross_entropy_with_logits(head(out).squeeze(1), labels)
        loss = task + vq_loss(ebc)
        ok_out &= torch.isfinite(out).all()
        ok_loss &= torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if restart_every and (done + 1) % restart_every == 0:
            before = {t: s["dead_codes"] for t, s in vq_stats(ebc).items()}
        if restart_every and done % restart_every == 0 and before:
            for table, s in vq_stats(ebc).items():
                log.restarts.append((done, table, before[table], s["dead_codes"]))
        if done % log_every == 0:
            stats = vq_stats(ebc)
            log.stats.append((done, stats))
            for table, s in stats.items():
                LOG.info(
                    "step %d %s perplexity=%.3f usage=%.3f dead_codes=%d vq_loss=%.4g",
                    done, table, s["perplexity"], s["usage"], s["dead_codes"], s["loss"],
                )
            bad = all_state_finite(ebc, head)
            if bad:
                log.nonfinite_state.append((done, bad))
    log.outputs_finite = bool(ok_out)
    log.losses_finite = bool(ok_loss)
    return ebc, log


def assert_stats_sane(log: RunLog) -> None:
    for step, stats in log.stats:
        assert set(stats) == {"t_item", "t_user"}, step
        for table, s in stats.items():
            assert all(math.isfinite(v) for v in s.values()), (step, table, s)
            # batch perplexity: 1 <= exp(entropy) <= min(K, rows in the batch)
            assert 1.0 - 1e-4 <= s["perplexity"] <= K + 1e-4, (step, table, s)
            assert 0.0 < s["usage"] <= 1.0, (step, table, s)
            assert math.isclose(s["usage"] * K, round(s["usage"] * K), abs_tol=1e-4), (step, table, s)
            assert 0 <= s["dead_codes"] <= K, (step, table, s)
            assert s["loss"] >= 0.0, (step, table, s)


def mean_stat(log: RunLog, table: str, name: str, skip_first: int = 1) -> float:
    """Mean of one logged stat of ``table`` over the log points after the first ``skip_first``."""
    values = [stats[table][name] for _, stats in log.stats[skip_first:]]
    return sum(values) / len(values)


STRESS_STEPS = 10_000
# batch usage (fraction of the K codes hit by a batch's 8-24 rows) that a healthy codebook clears
USAGE_FLOOR = {"t_item": 0.35, "t_user": 0.2}


def test_zipf_10k_steps_stay_finite_restart_dead_codes_and_log_usage(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vq_torchrec.stress")
    stream = ZipfStream(STRESS_STEPS, seed=0)
    _, log = train(STRESS_STEPS, RESTART_EVERY, stream)
    # no NaN/Inf anywhere: outputs, losses, tables, codebooks, EMA buffers, head
    assert log.outputs_finite and log.losses_finite
    assert log.nonfinite_state == []
    # usage / perplexity logged every RESTART_EVERY steps, and sane
    assert len(log.stats) == STRESS_STEPS // RESTART_EVERY
    assert sum("perplexity=" in r.getMessage() for r in caplog.records) == 2 * len(log.stats)
    assert_stats_sane(log)
    # dead codes are restarted: the bad init collapses the codebook, the first restart revives it,
    # no restart ever adds dead codes, and the codes stay alive between later restarts
    assert len(log.restarts) == 2 * (STRESS_STEPS // RESTART_EVERY)
    assert all(after <= before for _, _, before, after in log.restarts), log.restarts
    for table in ("t_item", "t_user"):
        per_table = [(before, after) for _, t, before, after in log.restarts if t == table]
        first_before, first_after = per_table[0]
        assert first_before >= K // 2 and first_after <= K // 4, (table, per_table[:3])
        late_before = [before for before, _ in per_table[len(per_table) // 2 :]]
        assert sum(late_before) / len(late_before) <= K / 4, (table, late_before)
        # healthy to the end: usage above the floor over the last 20 log points
        assert mean_stat(log, table, "usage", skip_first=len(log.stats) - 20) >= USAGE_FLOOR[table]
        assert mean_stat(log, table, "perplexity", skip_first=len(log.stats) - 20) >= 2.0


NO_RESTART_STEPS = 1500


def test_without_restart_the_codebook_stays_collapsed_and_restart_fixes_it() -> None:
    """Same model, data and steps; only ``restart_every`` differs. The usage floor that the
    restarted run clears is failed without restarts, and dead codes pile up."""
    stream = ZipfStream(NO_RESTART_STEPS, seed=1)
    _, with_log = train(NO_RESTART_STEPS, RESTART_EVERY, stream)
    _, without_log = train(NO_RESTART_STEPS, 0, stream)
    for log in (with_log, without_log):
        assert log.outputs_finite and log.losses_finite and log.nonfinite_state == []
        assert_stats_sane(log)
    assert without_log.restarts == []
    for table in ("t_item", "t_user"):
        with_usage = mean_stat(with_log, table, "usage")
        without_usage = mean_stat(without_log, table, "usage")
        assert with_usage >= USAGE_FLOOR[table] > without_usage, (table, with_usage, without_usage)
        with_dead = mean_stat(with_log, table, "dead_codes")
        without_dead = mean_stat(without_log, table, "dead_codes")
        assert with_dead <= K / 8 and without_dead >= K / 2, (table, with_dead, without_dead)


# --- quantizer level: every mode on Zipf-drawn rows --------------------------------------------

QUANTIZER_STEPS = 1000
QUANTIZER_ROWS = 32
# name: (VQConfig overrides, whether the run without restarts is left with dead codes). Outer
# mode matches ``dim`` differently-scaled rows per item, which keeps its codes alive anyway.
QUANTIZER_MODES: dict[str, tuple[dict[str, object], bool]] = {
    "vector-l2-ema": ({}, True),
    "vector-cosine-loss": ({"distance": "cosine", "update": "loss"}, True),
    "outer-l2-ema": ({"mode": "outer"}, False),
    "vector-l2-ema-rotation": ({"rotation_trick": True}, True),
    "residual-2-levels": ({"num_levels": 2}, True),
}


def quantizer_run(cfg: VQConfig, seed: int, steps: int) -> tuple[VectorQuantizer | ResidualVectorQuantizer, list[float]]:
    """Quantize Zipf-drawn rows of a fixed 500-row table (8 clusters, offset from the random
    init) for ``steps`` steps of ``QUANTIZER_ROWS`` rows with a small trainable drift; returns dead counts
    logged every RESTART_EVERY steps. Asserts finiteness of everything on the way."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, DIM, generator=g) * 3 + 4
    table = centres[torch.randint(0, 8, (500,), generator=g)] + 0.3 * torch.randn(500, DIM, generator=g)
    p = zipf_probs(500, ZIPF_EXPONENT, g)
    ids = torch.multinomial(p, steps * QUANTIZER_ROWS, replacement=True, generator=g).view(steps, QUANTIZER_ROWS)
    torch.manual_seed(seed)
    q = build_quantizer(DIM, cfg)
    shift = torch.zeros(DIM, requires_grad=True)
    opt = torch.optim.SGD([shift, *q.parameters()], lr=0.01)
    dead: list[float] = []
    ok = torch.ones((), dtype=torch.bool)
    for step in range(steps):
        z = table[ids[step]] + shift
        out = q(z)
        loss = out.loss + (out.quantized - table[ids[step]]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ok &= torch.isfinite(out.quantized).all() & torch.isfinite(loss) & torch.isfinite(shift.grad).all()
        if (step + 1) % RESTART_EVERY == 0:
            bad = [n for n, t in q.named_buffers() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            bad += [n for n, t in q.named_parameters() if not bool(torch.isfinite(t).all())]
            assert bad == [], (step, bad)
            assert 1.0 - 1e-4 <= float(out.perplexity) <= cfg.codebook_size + 1e-4
            dead.append(float(out.dead_codes))
    assert bool(ok)
    return q, dead


@pytest.mark.parametrize("name", list(QUANTIZER_MODES))
def test_quantizer_modes_on_zipf_rows_stay_finite_and_restart_reduces_dead_codes(name: str) -> None:
    overrides, dies_without_restart = QUANTIZER_MODES[name]
    base: dict[str, object] = {"codebook_size": K, "kmeans_init": False, "restart_every": RESTART_EVERY}
    cfg = VQConfig(**{**base, **overrides})  # type: ignore[arg-type]
    no_restart = VQConfig(**{**base, **overrides, "restart_every": 0})  # type: ignore[arg-type]
    _, dead_with = quantizer_run(cfg, seed=0, steps=QUANTIZER_STEPS)
    _, dead_without = quantizer_run(no_restart, seed=0, steps=QUANTIZER_STEPS)
    assert len(dead_with) == len(dead_without) == QUANTIZER_STEPS // RESTART_EVERY
    assert max(dead_with + dead_without) <= K * cfg.num_levels
    tail_with = sum(dead_with[-3:]) / 3
    tail_without = sum(dead_without[-3:]) / 3
    if dies_without_restart:
        assert tail_with < tail_without, (name, dead_with, dead_without)
    else:
        assert tail_with <= tail_without, (name, dead_with, dead_without)


# --- NaN / Inf reporting names the table and the feature ----------------------------------------


def small_bag_collection(weighted: bool = False, validate_inputs: bool = True) -> VQEmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="t_item", embedding_dim=DIM, num_embeddings=50, feature_names=["item", "history"]),
        EmbeddingBagConfig(name="t_user", embedding_dim=DIM, num_embeddings=20, feature_names=["user"]),
    ]
    cfg = VQConfig(codebook_size=4, kmeans_init=False)
    return VQEmbeddingBagCollection(tables, cfg, is_weighted=weighted, validate_inputs=validate_inputs)


def small_kjt(weights: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """item: [1], [2]; history: [3, 4], []; user: [5], [6]."""
    return KeyedJaggedTensor(
        keys=FEATURES,
        values=torch.tensor([1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([1, 1, 2, 0, 1, 1]),
        weights=weights,
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("training", [True, False])
def test_nan_in_an_embedding_row_names_table_and_feature(bad: float, training: bool) -> None:
    ebc = small_bag_collection()
    ebc.train(training)
    with torch.no_grad():
        ebc.ebc.embedding_bags["t_item"].weight[4, 0] = bad  # id 4 is only in "history"
    state = {k: v.clone() for k, v in ebc.quantize.state_dict().items()}
    with pytest.raises(ValueError, match=r"table 't_item', feature 'history': 1 of 2 rows hold NaN or Inf"):
        ebc(small_kjt())
    # nothing was updated by the failed step
    for k, v in ebc.quantize.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match=r"table 't_item', feature 'history'"):
        ebc.codes(small_kjt())


def test_nan_in_per_id_weights_names_table_feature_and_weights() -> None:
    weights = torch.ones(6)
    weights[5] = float("nan")  # the weight of user id 6
    # the input check (default) catches it before the lookup ...
    with pytest.raises(ValueError, match=r"per-id weights hold NaN or Inf: feature 'user' \(tables \['t_user'\]\): 1 of 2"):
        small_bag_collection(weighted=True)(small_kjt(weights))
    # ... and without it, the quantizer's check names the table, the feature and the weights
    unchecked = small_bag_collection(weighted=True, validate_inputs=False)
    with pytest.raises(ValueError, match=r"table 't_user', feature 'user': 1 of 2 rows.*per-id weights hold 1 NaN"):
        unchecked(small_kjt(weights))


def test_nan_in_a_sequence_row_names_table_and_feature() -> None:
    torch.manual_seed(0)
    tables = [
        EmbeddingConfig(name="t_a", embedding_dim=DIM, num_embeddings=30, feature_names=["f1", "f2"]),
        EmbeddingConfig(name="t_b", embedding_dim=DIM, num_embeddings=30, feature_names=["f1"]),
    ]
    ec = VQEmbeddingCollection(tables, VQConfig(codebook_size=4, kmeans_init=False))
    with torch.no_grad():
        ec.ec.embeddings["t_b"].weight[7] = float("nan")
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([7, 1, 2, 3]), lengths=torch.tensor([1, 2, 1, 0]))
    with pytest.raises(ValueError, match=r"table 't_b', feature 'f1' \(key 'f1@t_b'\): 1 of 3 rows hold NaN"):
        ec(kjt)


def test_huge_rows_get_a_clear_error_naming_the_table() -> None:
    """Regression (property test): |z| = 1e20 used to give an Inf loss silently."""
    ebc = small_bag_collection()
    with torch.no_grad():
        ebc.ebc.embedding_bags["t_user"].weight[5] = 1e20
    with pytest.raises(ValueError, match=r"table 't_user' \(features 'user'\) rejected its input.*\|z\| > 1e\+15"):
        ebc(small_kjt())
