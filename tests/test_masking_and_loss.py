"""Cloze masking, batching, the loss functions (hand-computed cases) and the leakage guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys_assets.bert4rec.data import (
    BatchBuilder,
    BatchingConfig,
    ExampleIndex,
    SequenceData,
    eval_batches,
)
from recsys_assets.data.split import assert_no_leakage
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig
from recsys_assets.bert4rec.train import TrainConfig, chunked_softmax_ce, cloze_loss_sum
from recsys_serving.contract import FIRST_ITEM_TOKEN, MASK_TOKEN, PAD_TOKEN


def _data(n_users: int = 30, seed: int = 0, with_context: bool = True) -> SequenceData:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(2, 50, size=int(rng.integers(1, 15))) for _ in range(n_users)]
    contexts = {}
    if with_context:
        contexts = {
            "tod": [rng.integers(1, 7, size=len(t)) for t in tokens],
            "event_types": [rng.integers(1, 4, size=len(t)) for t in tokens],
        }
    return SequenceData([f"u{i}" for i in range(n_users)], tokens, vocab_size=50, contexts=contexts)


def _all_batches(split, cfg: BatchingConfig, max_len: int = 8, epoch: int = 0):
    index = ExampleIndex(split.sequences, cfg, max_len)
    builder = BatchBuilder(split.sequences, split.contexts, index, seed=3)
    for step, ids in enumerate(index.epoch_batches(3, epoch)):
        yield ids, builder.build(ids, epoch, step), index


def test_prefix_windows_cover_every_transition_once_with_the_last_position_masked() -> None:
    split = _data().split("train")
    cfg = BatchingConfig(batch_size=7, windows="prefixes", mask_prob=0.0)
    seen: list[tuple[int, int]] = []
    for ids, batch, index in _all_batches(split, cfg):
        tok, lab = batch.tokens.numpy(), batch.labels.numpy()
        assert (tok[:, -1] == MASK_TOKEN).all()
        assert ((lab > 0).sum(axis=1) == 1).all()  # mask_prob 0: only the next item is a target
        for row, ex in enumerate(ids):
            s, end = index.seq_idx[ex], index.ends[ex]
            assert lab[row, -1] == split.sequences[s][end - 1]
            history = tok[row, :-1][tok[row, :-1] != PAD_TOKEN]
            np.testing.assert_array_equal(history, split.sequences[s][max(0, end - 8) : end - 1])
            seen.append((int(s), int(end)))
    expected = [(s, e) for s, seq in enumerate(split.sequences) for e in range(2, len(seq) + 1)]
    expected += [(s, 1) for s, seq in enumerate(split.sequences) if len(seq) == 1]
    assert sorted(seen) == sorted(expected)


def test_cloze_masking_labels_contexts_and_rate() -> None:
    split = _data(400, seed=1).split("train")
    cfg = BatchingConfig(batch_size=32, windows="last", mask_prob=0.3, mask_last_prob=0.0)
    masked = valid = 0
    for ids, batch, index in _all_batches(split, cfg, max_len=20):
        tok, lab = batch.tokens.numpy(), batch.labels.numpy()
        ev, tod = batch.contexts["event_types"].numpy(), batch.contexts["tod"].numpy()
        for row, ex in enumerate(ids):
            s = index.seq_idx[ex]
            window = split.sequences[s][-20:]
            n = len(window)
            assert (tok[row, : tok.shape[1] - n] == PAD_TOKEN).all()  # left padding
            t, l_ = tok[row, -n:], lab[row, -n:]
            m = t == MASK_TOKEN
            assert m.any()  # every window has a target
            np.testing.assert_array_equal(l_[m], window[m])  # labels are the hidden items
            np.testing.assert_array_equal(t[~m], window[~m])  # the rest is untouched
            assert (l_[~m] == 0).all()
            # request context stays, the outcome (event type) is hidden with the item
            np.testing.assert_array_equal(tod[row, -n:], split.contexts["tod"][s][-20:])
            assert (ev[row, -n:][m] == 0).all()
            np.testing.assert_array_equal(ev[row, -n:][~m], split.contexts["event_types"][s][-20:][~m])
            masked += int(m.sum())
            valid += n
    assert 0.27 < masked / valid < 0.36  # 0.3 plus the forced target of windows that drew none


def test_mask_last_probability_one_masks_every_last_position() -> None:
    split = _data().split("train")
    cfg = BatchingConfig(batch_size=8, windows="last", mask_prob=0.0, mask_last_prob=1.0)
    for _, batch, _ in _all_batches(split, cfg):
        assert (batch.tokens[:, -1] == MASK_TOKEN).all()
        assert ((batch.labels > 0).sum(dim=1) == 1).all()


def test_batches_are_deterministic_bucketed_and_complete() -> None:
    split = _data(300, seed=2).split("train")
    cfg = BatchingConfig(batch_size=16, windows="prefixes", bucket_batches=8)
    index = ExampleIndex(split.sequences, cfg, 8)
    a, b = index.epoch_batches(5, 0), index.epoch_batches(5, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, index.epoch_batches(5, 1)))
    assert sorted(np.concatenate(a).tolist()) == list(range(len(index)))
    flat = BatchingConfig(batch_size=16, windows="prefixes", bucket_batches=1)
    unbucketed = ExampleIndex(split.sequences, flat, 8).epoch_batches(5, 0)

    def padding(batches) -> int:
        return sum(int(index.window_len[x].max()) * len(x) - int(index.window_len[x].sum()) for x in batches)

    assert padding(a) < 0.5 * padding(unbucketed)
    builder = BatchBuilder(split.sequences, {}, index, seed=1)
    torch.testing.assert_close(builder.build(a[0], 0, 0).tokens, builder.build(a[0], 0, 0).tokens)


def test_ranks_split_a_global_batch_without_changing_it() -> None:
    split = _data(50).split("train")
    cfg = BatchingConfig(batch_size=9, windows="prefixes", mask_prob=0.4)
    index = ExampleIndex(split.sequences, cfg, 8)
    builder = BatchBuilder(split.sequences, split.contexts, index, seed=1)
    ids = index.epoch_batches(0, 0)[0]
    whole = builder.build(ids, 0, 0)
    parts = [builder.build(ids, 0, 0, rank=r, world=2) for r in range(2)]
    assert parts[0].n_targets_global == parts[1].n_targets_global == whole.n_targets_global
    assert sum(int((p.labels > 0).sum()) for p in parts) == whole.n_targets_global
    for r, part in enumerate(parts):
        w = part.tokens.shape[1]
        torch.testing.assert_close(part.tokens, whole.tokens[r::2, -w:])
        torch.testing.assert_close(part.labels, whole.labels[r::2, -w:])


def test_a_rank_left_without_rows_gets_a_row_without_targets_and_a_zero_finite_gradient() -> None:
    # a global batch of one window on two ranks (the end of an epoch): rank 1 has nothing to train
    # on, yet must run a backward for DDP's all-reduce
    split = _data(50).split("train")
    cfg = BatchingConfig(batch_size=9, windows="prefixes", mask_prob=0.4)
    index = ExampleIndex(split.sequences, cfg, 8)
    builder = BatchBuilder(split.sequences, split.contexts, index, seed=1)
    ids = index.epoch_batches(0, 0)[0][:1]
    owner, idle = (builder.build(ids, 0, 0, rank=r, world=2) for r in range(2))
    assert idle.tokens.shape[0] == 1 and not bool((idle.labels > 0).any())
    assert int((owner.labels > 0).sum()) == owner.n_targets_global == idle.n_targets_global
    assert not bool((idle.tokens == MASK_TOKEN).any())
    model = BERT4Rec(BERT4RecConfig(vocab_size=50, hidden=8, layers=1, heads=2, max_len=8, dropout=0.0))
    loss = cloze_loss_sum(model, model(idle.tokens, **idle.contexts), idle.labels, TrainConfig(loss="full"))
    loss.backward()
    assert float(loss) == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) and float(g.abs().max()) == 0.0 for g in grads)


def test_eval_inputs_are_right_aligned_history_plus_mask() -> None:
    data = _data(20)
    split = data.split("train")
    for rows, tokens, ctx in eval_batches(split.test, max_len=6, batch_size=4):
        for i, r in enumerate(rows):
            history = split.test.histories[r][-5:]
            row = tokens[i].numpy()
            assert row[-1] == MASK_TOKEN
            np.testing.assert_array_equal(row[-1 - len(history) : -1], history)
            assert (row[: len(row) - 1 - len(history)] == PAD_TOKEN).all()
            assert ctx["event_types"][i, -1] == 0  # the target's outcome is unknown at request time
            u = split.test.source_rows[r]
            assert ctx["tod"][i, -1] == data.contexts["tod"][u][-1]  # request context = the target's


# ----------------------------------------------------------------------------- loss


def test_chunked_softmax_ce_hand_computed_case() -> None:
    # logits [0, ln 3] -> p(target=1) = 3/4
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    table = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    loss = chunked_softmax_ce(h, table, bias, torch.tensor([1]))
    assert loss.item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    loss.backward()
    # d loss / d logits = softmax - onehot = [1/4, -1/4]
    torch.testing.assert_close(bias.grad, torch.tensor([0.25, -0.25]))
    torch.testing.assert_close(h.grad, torch.tensor([[-0.25 * math.log(3.0), 0.0]]))
    # label smoothing 0.1 over 2 classes: 0.9 * CE + 0.1 * mean(-log p)
    smoothed = chunked_softmax_ce(h.detach(), table.detach(), bias.detach(), torch.tensor([1]), label_smoothing=0.1)
    want = 0.9 * math.log(4 / 3) + 0.1 * 0.5 * (math.log(4) + math.log(4 / 3))
    assert smoothed.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_chunked_softmax_ce_matches_pytorch(smoothing: float) -> None:
    torch.manual_seed(0)
    h = torch.randn(70, 8, requires_grad=True)
    table = torch.randn(30, 8, requires_grad=True)
    bias = torch.randn(30, requires_grad=True)
    targets = torch.randint(0, 30, (70,))
    ours = chunked_softmax_ce(h, table, bias, targets, smoothing, chunk=16)
    grads = torch.autograd.grad(ours * 0.5, (h, table, bias))
    ref = F.cross_entropy(h @ table.t() + bias, targets, reduction="sum", label_smoothing=smoothing)
    ref_grads = torch.autograd.grad(ref * 0.5, (h, table, bias))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def _loss_model() -> BERT4Rec:
    torch.manual_seed(0)
    return BERT4Rec(BERT4RecConfig(vocab_size=6, hidden=8, layers=1, heads=1, max_len=4, dropout=0.0, output_head=False))


def test_full_loss_covers_only_masked_positions_over_item_tokens() -> None:
    model = _loss_model()
    hidden = torch.randn(2, 3, 8)
    labels = torch.tensor([[0, 3, 0], [0, 0, 5]])
    got = cloze_loss_sum(model, hidden, labels, TrainConfig(loss="full"))
    logits = hidden[labels > 0] @ model.item_emb.weight[2:].t() + model.out_bias[2:]
    want = F.cross_entropy(logits, labels[labels > 0] - 2, reduction="sum")  # PAD and MASK are no class
    torch.testing.assert_close(got, want)


def test_sampled_loss_hand_computed_with_accidental_hit_and_logq() -> None:
    model = _loss_model()
    with torch.no_grad():
        model.item_emb.weight.zero_()
        model.item_emb.weight[2, 0] = 2.0  # target item 2 scores 2, every other item 0
    hidden = torch.zeros(1, 1, 8)
    hidden[0, 0, 0] = 1.0
    labels = torch.tensor([[2]])
    negatives = torch.tensor([3, 4, 2])  # the last one is the target: an accidental hit, ignored
    cfg = TrainConfig(loss="sampled", logq_correction=False)
    got = cloze_loss_sum(model, hidden, labels, cfg, negatives)
    assert got.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-6)
    # logQ: each logit minus log q; q(3) large -> item 3 counts less as a competitor
    log_q = torch.log(torch.tensor([1.0, 1.0, 0.5, 0.25, 0.25, 1.0]))
    cfg = TrainConfig(loss="sampled", logq_correction=True)
    got = cloze_loss_sum(model, hidden, labels, cfg, negatives, log_q[negatives], log_q)
    pos = 2 - math.log(0.5)
    neg = [0 - math.log(0.25), 0 - math.log(0.25)]
    want = -(pos - math.log(math.exp(pos) + sum(math.exp(n) for n in neg)))
    assert got.item() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- leakage


@pytest.mark.parametrize("fit", ["train", "train+valid"])
def test_no_held_out_item_ever_reaches_training(fit: str) -> None:
    # held-out positions carry tokens that occur nowhere else, so any leak is visible
    rng = np.random.default_rng(0)
    tokens, valid_tokens, test_tokens = [], set(), set()
    next_unique = 100
    for _ in range(40):
        body = list(rng.integers(2, 60, size=int(rng.integers(1, 10))))
        valid_tok, test_tok = next_unique, next_unique + 1
        next_unique += 2
        tokens.append(np.asarray(body + [valid_tok, test_tok]))
        valid_tokens.add(valid_tok)
        test_tokens.add(test_tok)
    data = SequenceData([f"u{i}" for i in range(40)], tokens, vocab_size=next_unique)
    split = data.split(fit)
    forbidden = test_tokens | (valid_tokens if fit == "train" else set())
    for windows in ("last", "prefixes"):
        cfg = BatchingConfig(batch_size=5, windows=windows, mask_prob=0.5)
        for _, batch, _ in _all_batches(split, cfg, max_len=12):
            seen = set(batch.tokens.unique().tolist()) | set(batch.labels.unique().tolist())
            assert not (seen & forbidden)
    if fit == "train":
        assert set(split.valid.targets.tolist()) == valid_tokens
        assert all(not (set(x.tolist()) & forbidden) for x in split.valid.histories)
    else:
        assert split.valid is None
        assert valid_tokens <= set(np.concatenate(split.sequences).tolist())  # folded in
    assert set(split.test.targets.tolist()) == test_tokens
    assert all(test_tokens.isdisjoint(x.tolist()) for x in split.test.histories)


def test_tuning_split_never_holds_a_test_item_and_validates_on_unseen_last_inputs() -> None:
    data = _data(60, seed=4)
    split = data.tuning_split()
    assert split.fit == "train" and split.valid is not None
    users = [u for u, t in enumerate(data.tokens) if len(t) >= 4]
    assert list(split.valid.source_rows) == users
    for row, u in enumerate(users):
        full = data.tokens[u]
        np.testing.assert_array_equal(split.valid.histories[row], full[:-2])  # input: all but the last two
        assert split.valid.targets[row] == full[-2]
    fitted = [u for u, t in enumerate(data.tokens) if len(t) >= 2]
    assert len(split.sequences) == len(fitted)
    for seq, u in zip(split.sequences, fitted):
        full = data.tokens[u]
        np.testing.assert_array_equal(seq, full[: len(full) - 3 if len(full) >= 4 else len(full) - 1])


def test_leakage_guard_raises_on_a_tampered_split() -> None:
    data = _data(10)
    split = data.split("train")
    u = next(i for i, t in enumerate(data.tokens) if len(t) >= 3)
    split.sequences[u] = data.tokens[u][:-1]  # now reaches the validation item
    with pytest.raises(AssertionError, match="held-out"):
        assert_no_leakage(data.user_ids, data.tokens, split)


def test_bad_input_is_rejected_clearly(tmp_path) -> None:
    with pytest.raises(ValueError, match="item tokens"):
        SequenceData(["a"], [np.asarray([1, 5])], vocab_size=10)
    with pytest.raises(ValueError, match="context 'tod' has 1 positions"):
        SequenceData(["a"], [np.asarray([2, 5])], vocab_size=10, contexts={"tod": [np.asarray([1])]})
    with pytest.raises(ValueError, match="fit must be"):
        _data(3).split("all")
    bad = tmp_path / "seq.txt"
    bad.write_text("1 2 3\n2 x 4\n")
    with pytest.raises(ValueError, match="seq.txt:2"):
        SequenceData.from_sasrec_txt(bad)


def test_next_item_objective_uses_the_last_block_shortcut_with_the_same_loss_and_gradients() -> None:
    from recsys_assets.bert4rec.train import _Objective

    split = _data(40).split("train")
    cfg = BatchingConfig(batch_size=16, windows="prefixes", mask_prob=0.0)
    _, batch, _ = next(_all_batches(split, cfg))
    torch.manual_seed(0)
    model = BERT4Rec(BERT4RecConfig(vocab_size=50, hidden=16, layers=2, heads=2, max_len=8, dropout=0.0,
                                    n_tod=8, init_std=0.2))
    train_cfg = TrainConfig(loss="full")
    contexts = {"tod": batch.contexts["tod"], "event_types": batch.contexts["event_types"]}
    shortcut = _Objective(model, train_cfg, None)(batch.tokens, batch.labels, contexts, None, None)
    shortcut.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = cloze_loss_sum(model, model(batch.tokens, **contexts), batch.labels, train_cfg)
    full.backward()
    torch.testing.assert_close(shortcut, full, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
