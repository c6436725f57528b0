"""The eager DMF model against the independent float64 reference (reference_dmf.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dmf_export.errors import DMFExportError
from dmf_export.models import DMF
import reference_dmf
from reference_dmf import dmf_reference

TOL = dict(rtol=1e-4, atol=1e-4)
CONFIGS = [(64, 1), (640, 1), (64, 3), (160, 3)]
EPISODES = {
    "5way-1shot": dict(way=5, shot=1, queries=3),
    "5way-2shot": dict(way=5, shot=2, queries=2),
    "5way-5shot": dict(way=5, shot=5, queries=2),
    "3way-2shot": dict(way=3, shot=2, queries=4),
    "single-query": dict(way=4, shot=1, queries=1),
}

_MODELS: dict = {}


@pytest.fixture
def dmf_model(dmf_state_dict):
    """``dmf_model(groups, kernel)`` → an eval DMF holding the seeded random weights."""

    def make(groups=64, kernel=1, classes=64):
        key = (groups, kernel, classes)
        if key not in _MODELS:
            model = DMF(groups=groups, kernel=kernel, num_classes=classes)
            model.load_state_dict(dmf_state_dict(groups, kernel, classes))
            _MODELS[key] = model.eval().requires_grad_(False)
        return _MODELS[key]

    return make


def _spec_keys():
    """The released checkpoints' 104 entries (docs/op.md, "Checkpoints"), in the order the original's modules produce them (a
    block's own buffer first, then its children in registration order)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = []
    for n in range(1, 5):
        b = f"base.layer{n}.0."
        keys.append(b + "num_batches_tracked")
        for i in (1, 2, 3):
            keys += [b + f"conv{i}.weight"] + [b + f"bn{i}.{e}" for e in bn]
        keys += [b + "downsample.0.weight"] + [b + f"downsample.1.{e}" for e in bn]
    return keys + ["global_clasifier.weight", "global_clasifier.bias",
                   "dw_gen.off_conv.weight", "dw_gen.kernel_conv.weight"]


def _assert_matches_reference(scores, reference):
    assert scores.shape == reference.shape
    torch.testing.assert_close(scores.double(), reference, **TOL)
    if reference.shape[1] > 1:
        # The arg-max comparison is meaningful with a winner clear of float32 error
        # (about 1e-6 relative here); a failure here means: pick another seed.
        top2 = reference.topk(2, dim=1).values
        assert ((top2[:, 0] - top2[:, 1]) / top2[:, 0].abs()).min() > 1e-5, "degenerate episode"
    assert torch.equal(scores.argmax(1), reference.argmax(1))


# -- numbers -----------------------------------------------------------------------------

_REFERENCE_FEATURES: dict = {}


def _reference_scores(state, support, labels, query, groups, kernel):
    """dmf_reference, reusing the float64 backbone features of an episode across
    configurations when (and only when) their backbone weights are identical."""
    backbone = {k: v for k, v in state.items() if k.startswith("base.")}
    images = torch.cat([support, query])
    key = (images.shape, float(images.double().sum()), float(images.double().square().sum()))
    cached = _REFERENCE_FEATURES.get(key)
    if cached is None or not (torch.equal(cached[0], images) and all(
            torch.equal(cached[1][k], v) for k, v in backbone.items())):
        features = reference_dmf.backbone(reference_dmf.as_float64(backbone), images.double())
        cached = _REFERENCE_FEATURES[key] = (images, backbone, features)
    features, shots = cached[2], support.shape[0]
    return reference_dmf.head(reference_dmf.as_float64(state), features[:shots], labels,
                              features[shots:], groups, kernel)


@pytest.mark.parametrize("episode", list(EPISODES), ids=list(EPISODES))
@pytest.mark.parametrize("groups,kernel", CONFIGS, ids=[f"G{g}K{k}" for g, k in CONFIGS])
def test_scores_match_reference_small_images(groups, kernel, episode, dmf_model,
                                             dmf_state_dict, make_episode):
    seed = list(EPISODES).index(episode)
    support, labels, query = make_episode(**EPISODES[episode], size=32, seed=seed,
                                          query_noise=0.8)
    with torch.no_grad():
        scores = dmf_model(groups, kernel)(support, labels, query)
    reference = _reference_scores(dmf_state_dict(groups, kernel), support, labels, query,
                                  groups, kernel)
    _assert_matches_reference(scores, reference)


@pytest.mark.parametrize("groups,kernel", CONFIGS, ids=[f"G{g}K{k}" for g, k in CONFIGS])
def test_scores_match_reference_84px(groups, kernel, dmf_model, dmf_state_dict, make_episode):
    support, labels, query = make_episode(way=2, shot=1, queries=2, size=84, seed=7,
                                          query_noise=0.8)
    with torch.no_grad():
        model = dmf_model(groups, kernel)
        assert model.base(query[:1]).shape == (1, 640, 11, 11)  # 84 → 42 → 21 → 11 → 11
        scores = model(support, labels, query)
    reference = _reference_scores(dmf_state_dict(groups, kernel), support, labels, query,
                                  groups, kernel)
    _assert_matches_reference(scores, reference)


def test_float64_model_matches_reference_closely(dmf_state_dict, make_episode):
    model = DMF(64, 3).double()
    model.load_state_dict(dmf_state_dict(64, 3))
    support, labels, query = make_episode(way=3, shot=2, queries=2, dtype=torch.float64, seed=3)
    with torch.no_grad():
        scores = model.eval()(support, labels, query)
    assert scores.dtype == torch.float64
    reference = dmf_reference(dmf_state_dict(64, 3), support, labels, query, 64, 3)
    torch.testing.assert_close(scores, reference, rtol=1e-10, atol=1e-10)


def test_each_query_row_depends_only_on_that_query(dmf_model, make_episode):
    # pair i = q·way + k: scores[q] must be what an episode with query q alone gives
    support, labels, query = make_episode(way=4, shot=1, queries=3, seed=11)
    model = dmf_model(64, 3)
    with torch.no_grad():
        scores = model(support, labels, query)
        for q in range(3):
            alone = model(support, labels, query[q:q + 1])
            torch.testing.assert_close(scores[q:q + 1], alone, rtol=1e-5, atol=1e-5)


def test_support_order_and_class_columns(dmf_model, make_episode):
    support, labels, query = make_episode(way=3, shot=2, queries=2, seed=5)
    model = dmf_model(64, 1)
    with torch.no_grad():
        scores = model(support, labels, query)
        shuffled = torch.tensor([4, 0, 5, 2, 1, 3])
        same = model(support[shuffled], labels[shuffled], query)
        columns = torch.tensor([2, 0, 1])
        permuted = model(support, labels[:, columns], query)
    torch.testing.assert_close(same, scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted, scores[:, columns], rtol=1e-5, atol=1e-5)


def test_integer_one_hot_labels_give_the_references_scores(dmf_model, dmf_state_dict, make_episode):
    support, labels, query = make_episode(way=3, shot=2, queries=2, seed=2, query_noise=0.8)
    with torch.no_grad():
        scores = dmf_model(64, 1)(support, labels.long(), query)
    assert scores.dtype == torch.float32
    reference = dmf_reference(dmf_state_dict(64, 1), support, labels, query, 64, 1)
    _assert_matches_reference(scores, reference)


@pytest.mark.parametrize("groups,kernel", [(64, 1), (160, 3)], ids=["G64K1", "G160K3"])
def test_backbone_and_head_apart_match_the_reference_halves(groups, kernel, dmf_model,
                                                             dmf_state_dict, make_episode):
    """The split graph's two halves: ``base`` against the reference backbone, and ``head``
    on given features against the reference head on the same features."""
    support, labels, query = make_episode(way=2, shot=2, queries=2, seed=4)
    model = dmf_model(groups, kernel)
    state = reference_dmf.as_float64(dmf_state_dict(groups, kernel))
    with torch.no_grad():
        features = model.base(torch.cat([support, query]))
    torch.testing.assert_close(features.double(),
                               reference_dmf.backbone(state, torch.cat([support, query]).double()),
                               **TOL)
    # the head on features of its own (3×3, not the backbone's 4×4), so a head bug cannot
    # hide behind a backbone one
    generator = torch.Generator().manual_seed(8)
    features = torch.rand(6, 640, 3, 3, generator=generator)
    with torch.no_grad():
        scores = model.head(features[:4], labels, features[4:])
    reference = reference_dmf.head(state, features[:4].double(), labels, features[4:].double(),
                                   groups, kernel)
    _assert_matches_reference(scores, reference)


# -- eval semantics ------------------------------------------------------------------------

def test_forward_leaves_every_buffer_unchanged_even_in_train_mode(dmf_state_dict, make_episode):
    model = DMF(64, 1)
    model.load_state_dict(dmf_state_dict(64, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    support, labels, query = make_episode(way=2, shot=1, queries=1, seed=1)
    with torch.no_grad():
        eval_scores = model.eval()(support, labels, query)
        train_scores = model.train()(support, labels, query)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # BN uses the running statistics whatever the mode
    torch.testing.assert_close(train_scores, eval_scores, rtol=0, atol=0)


def test_odeint_runs_four_function_evaluations(dmf_model, make_episode, monkeypatch):
    model = dmf_model(64, 1)
    calls = []
    original = type(model.alignment).forward

    def counting(self, t, state):
        calls.append(float(t))
        return original(self, t, state)

    monkeypatch.setattr(type(model.alignment), "forward", counting)
    support, labels, query = make_episode(way=2, shot=1, queries=1, seed=1)
    with torch.no_grad():
        model(support, labels, query)
    # torchdiffeq's rk4 over [0, 1]: one 3/8-rule step at t = 0, 1/3, 2/3, 1
    assert calls == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


# -- structure -------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,kernel", [(64, 1), (160, 3)])
def test_state_dict_keys_are_the_checkpoint_layout(groups, kernel):
    state = DMF(groups, kernel, num_classes=351).state_dict()
    assert list(state) == _spec_keys()
    assert len(state) == 104
    assert state["dw_gen.off_conv.weight"].shape == (18, 1280, 5, 5)
    assert state["dw_gen.kernel_conv.weight"].shape == (groups * kernel ** 2, 640, 3, 3)
    assert state["global_clasifier.weight"].shape == (351, 640, 1, 1)
    assert state["global_clasifier.bias"].shape == (351,)
    for n in range(1, 5):
        tracked = state[f"base.layer{n}.0.num_batches_tracked"]
        assert tracked.dtype == torch.int64 and tracked.shape == ()


def test_modules_other_code_builds_on():
    model = DMF(160, 3, num_classes=64)
    assert (model.groups, model.kernel, model.num_classes) == (160, 3, 64)
    assert all(type(v) is int for v in (model.groups, model.kernel, model.num_classes))
    block = model.base.layer1[0]
    for conv in (block.conv1, block.conv2, block.conv3, block.downsample[0]):
        assert isinstance(conv, nn.Conv2d)
    for bn in (block.bn1, block.bn2, block.bn3, block.downsample[1]):
        assert isinstance(bn, nn.BatchNorm2d) and bn.eps == 1e-5
    assert isinstance(model.dw_gen.off_conv, nn.Conv2d)
    assert model.dw_gen.off_conv.padding == (2, 2) and model.dw_gen.off_conv.bias is None
    assert isinstance(model.dw_gen.kernel_conv.weight, nn.Parameter)


@pytest.mark.parametrize("groups,kernel,millions", [(64, 1, 13.4), (640, 1, 16.7)])
def test_parameter_count_matches_spec(groups, kernel, millions):
    count = sum(p.numel() for p in DMF(groups, kernel).parameters())
    assert round(count / 1e6, 1) == millions


@pytest.mark.parametrize("groups,kernel", [(100, 1), (0, 1), (64, 2), (64, 5)])
def test_impossible_configuration_is_refused(groups, kernel):
    with pytest.raises(DMFExportError, match="groups|kernel"):
        DMF(groups, kernel)


# -- bad inputs -------------------------------------------------------------------------------

def _bad(make_episode, **changes):
    support, labels, query = make_episode(way=3, shot=2, queries=2, seed=0)
    episode = dict(support=support, support_labels=labels, query=query)
    for name, change in changes.items():
        episode[name] = change(episode[name])
    return episode


@pytest.mark.parametrize("changes,message", [
    (dict(support_labels=lambda y: y[:-1]), "5 rows but support has 6 images"),
    (dict(support_labels=lambda y: y.argmax(1)), "one-hot"),
    (dict(support_labels=lambda y: y[None]), "one-hot"),
    (dict(support_labels=lambda y: y[:, :0]), "one-hot"),
    (dict(support_labels=lambda y: torch.cat([y, torch.zeros(6, 1)], 1)), "class 3 has no support"),
    (dict(support_labels=lambda y: y * 0.5), "not one-hot: row 0 holds 0.5"),
    (dict(support_labels=lambda y: y + y.roll(1, 1)), "not one-hot: row 0 sums to 2"),
    (dict(support=lambda s: s.index_fill(0, torch.tensor([1]), float("nan"))),
     r"support has NaN or Inf values \(image 1"),
    (dict(query=lambda q: q[..., :16]), "support is 32×32 but query is 32×16"),
    (dict(query=lambda q: q[0]), r"query must be \[N, 3, H, W\]"),
    (dict(support=lambda s: s[:, :1]), "support has 1 channels, expected 3"),
    (dict(query=lambda q: q[:0]), "query is empty"),
    (dict(query=lambda q: q.double()), "differ in dtype"),
    (dict(support=lambda s: s.double(), query=lambda q: q.double()), "model is torch.float32"),
    (dict(support=lambda s: (s * 100).long(), query=lambda q: (q * 100).long()), "floating-point"),
], ids=["labels-rows", "labels-1d", "labels-3d", "labels-no-classes", "empty-class",
        "labels-half", "labels-two-classes", "nan-pixel", "query-size",
        "query-3d", "support-channels", "no-query", "mixed-dtype", "model-dtype", "integer-images"])
def test_bad_episode_is_one_clear_error(changes, message, dmf_model, make_episode):
    with pytest.raises(DMFExportError, match=message):
        dmf_model(64, 1)(**_bad(make_episode, **changes))


@pytest.mark.cuda
def test_cuda_matches_cpu(dmf_model, make_episode, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 here
    model = dmf_model(64, 3)
    support, labels, query = make_episode(way=5, shot=1, queries=3, seed=9)
    with torch.no_grad():
        cpu = model(support, labels, query)
        gpu = DMF(64, 3).cuda().eval()
        gpu.load_state_dict(model.state_dict())
        scores = gpu(support.cuda(), labels.cuda(), query.cuda())
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), cpu, **TOL)
