"""The deployment graph computes what the eager DMF model computes, in every form it ships.

Every number is checked against the eager model (``dmf_export.models.DMF``, the original
formulation with torchdiffeq), never against the graph itself. Small images (32×32 →
4×4 features, 36×36 → 5×5) keep the backbone cheap; one test runs the real 84×84.
"""
import copy
import inspect

import pytest
import torch
from torch import nn
from torch.export import Dim
from torchdiffeq import odeint

from dmf_export.deploy import build_episode_graph, build_split_graphs
from dmf_export.errors import DMFExportError
from dmf_export.models import DMF

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.[a-z]+` is deprecated")

CONFIGS = [(64, 1), (640, 1), (64, 3)]  # (groups, kernel)
CONFIG_IDS = [f"G{groups}K{kernel}" for groups, kernel in CONFIGS]
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
# torch.onnx.export passes this to torch.export where it exists (torch 2.9 and later)
DEFERRED_ASSERTS = ({"prefer_deferred_runtime_asserts_over_guards": True}
                    if "prefer_deferred_runtime_asserts_over_guards"
                    in inspect.signature(torch.export.export).parameters else {})

EPISODES = {  # name: (way, shot, queries, image size)
    "5w1s": (5, 1, 3, 32),
    "5w5s": (5, 5, 2, 32),
    "3way-odd-size": (3, 2, 4, 36),
    "10way": (10, 1, 2, 32),
    "single-query": (5, 1, 1, 32),
}


@pytest.fixture(scope="module")
def dmf(dmf_state_dict):
    """``dmf(groups, kernel)`` → (eager model, deployment graph), built once per module.

    Every configuration shares the seeded, BN-calibrated weights of the default one
    (G = 64, K = 1); the others draw their own meta-filter weight at the same scale (the
    fan-in, 640·3·3, does not depend on G or K).
    """
    base = dmf_state_dict()
    cache = {}

    def get(groups, kernel):
        if (groups, kernel) not in cache:
            state_dict = dict(base)
            if (groups, kernel) != (64, 1):
                generator = torch.Generator().manual_seed(groups * 10 + kernel)
                scale = base["dw_gen.kernel_conv.weight"].std()
                state_dict["dw_gen.kernel_conv.weight"] = scale * torch.randn(
                    groups * kernel * kernel, 640, 3, 3, generator=generator)
            model = DMF(groups, kernel, base["global_clasifier.bias"].shape[0])
            model.load_state_dict(state_dict)
            model.eval().requires_grad_(False)
            cache[groups, kernel] = (model, build_episode_graph(model))
        return cache[groups, kernel]

    return get


def episode(make_episode, way, shot, queries, size, seed=0, dtype=torch.float32):
    return make_episode(way=way, shot=shot, queries=queries, size=size, seed=seed, dtype=dtype)


def assert_same_scores(actual, expected, **tolerance):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **(tolerance or TOLERANCE))
    assert torch.equal(actual.argmax(1), expected.argmax(1))


# -- parity with the eager model ------------------------------------------------------

@pytest.mark.parametrize("name", EPISODES)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_episode_graph_matches_eager_model(dmf, make_episode, config, name):
    model, graph = dmf(*config)
    inputs = episode(make_episode, *EPISODES[name])  # labels shuffled, not in class order
    with torch.no_grad():
        assert_same_scores(graph(*inputs), model(*inputs))


def test_labels_out_of_class_order_give_the_eager_scores(dmf, make_episode):
    model, graph = dmf(64, 3)
    support, labels, query = episode(make_episode, 4, 2, 3, 32, seed=5)
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(1))
    support, labels = support[order], labels[order]
    assert not torch.equal(labels.argmax(1), labels.argmax(1).sort().values)
    with torch.no_grad():
        assert_same_scores(graph(support, labels, query), model(support, labels, query))


def test_episode_graph_matches_eager_model_at_84x84(dmf, make_episode):
    model, graph = dmf(64, 1)
    inputs = episode(make_episode, 3, 1, 2, 84, seed=3)  # 11×11 features: the 13·13 border
    with torch.no_grad():
        assert_same_scores(graph(*inputs), model(*inputs))


def test_encoder_taking_a_few_images_at_a_time_matches_eager_backbone(dmf):
    model, _ = dmf(64, 1)
    encoder = build_episode_graph(model, cpu_batch=3).encoder  # 8 images: 3 + 3 + 2
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = encoder(images)
        expected = model.base(images)
    assert features.is_contiguous() and features.shape == expected.shape
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_episode_graph_is_exact_in_float64(dmf, make_episode, config):
    # in float64 the restructuring (BN folding, split offset conv, element-wise
    # alignment, one weighted score) must agree to rounding, far below the fp32 tolerance
    model = copy.deepcopy(dmf(*config)[0]).double()
    graph = build_episode_graph(model)
    inputs = episode(make_episode, 4, 2, 3, 36, seed=7, dtype=torch.float64)
    with torch.no_grad():
        assert_same_scores(graph(*inputs), model(*inputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", [1, 3], ids=["K1-closed-form", "K3-unrolled"])
@pytest.mark.parametrize("method, steps", [("euler", 2), ("midpoint", 1), ("heun2", 3),
                                           ("heun3", 2), ("rk4", 3)])
def test_solver_choice_matches_eager_model_with_that_torchdiffeq_solver(
        dmf, make_episode, monkeypatch, method, steps, kernel):
    model, _ = dmf(64, kernel)
    graph = build_episode_graph(model, solver=method, steps=steps)

    def align(query_pairs, meta_filter, *_):  # the solver here, not the model's own choice
        times = torch.tensor([0.0, 1.0], dtype=query_pairs.dtype)
        return odeint(model.alignment, (query_pairs, meta_filter), times, method=method,
                      options={"step_size": 1.0 / steps})[0][1]

    monkeypatch.setattr(model, "align", align)
    inputs = episode(make_episode, 5, 1, 2, 32, seed=11)
    with torch.no_grad():
        assert_same_scores(graph(*inputs), model(*inputs))


# -- the two halves --------------------------------------------------------------------

def test_encoder_is_the_eager_backbone_with_batch_norm_folded(dmf, make_episode):
    model, graph = dmf(64, 1)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in graph.modules())
    assert all(m.bias is not None for m in graph.encoder.modules() if isinstance(m, nn.Conv2d))
    images = torch.cat(episode(make_episode, 3, 1, 3, 36, seed=2)[::2])
    with torch.no_grad():
        expected = model.base(images)
        actual = graph.encoder(images)
    assert actual.shape == expected.shape == (6, 640, 5, 5)
    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_head_on_eager_features_matches_eager_head(dmf, make_episode, config):
    model, graph = dmf(*config)
    support, labels, query = episode(make_episode, 4, 2, 3, 32, seed=4)
    with torch.no_grad():
        support_features, query_features = model.base(support), model.base(query)
        assert_same_scores(graph.head(support_features, labels, query_features),
                           model.head(support_features, labels, query_features))


def test_encoder_then_head_matches_eager_model_eager_and_scripted(dmf, make_episode):
    model, _ = dmf(64, 3)
    encoder, head = build_split_graphs(model)
    support, labels, query = episode(make_episode, 5, 2, 3, 32, seed=6)
    with torch.no_grad():
        expected = model(support, labels, query)
        for encode, score in ((encoder, head), (torch.jit.script(encoder), torch.jit.script(head))):
            assert_same_scores(score(encode(support), labels, encode(query)), expected)


# -- TorchScript and torch.export -------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_scripted_graph_survives_save_and_load(dmf, make_episode, tmp_path, config):
    model, graph = dmf(*config)
    path = tmp_path / "episode.pt"
    torch.jit.save(torch.jit.script(graph), str(path))
    loaded = torch.jit.load(str(path))
    # sizes unlike any above: S, way, Q and the image size all differ from the trace-free
    # compile, which never saw a shape
    for size in [(4, 3, 5, 40), (2, 1, 1, 24)]:
        inputs = episode(make_episode, *size, seed=8)
        with torch.no_grad():
            assert_same_scores(loaded(*inputs), model(*inputs))


@pytest.mark.parametrize("config", [(64, 1), (64, 3)], ids=["G64K1", "G64K3"])
def test_exported_program_has_dynamic_support_way_and_queries(dmf, make_episode, config):
    model, graph = dmf(*config)
    shots, way, queries = Dim("S", min=1), Dim("way", min=1), Dim("Q", min=1)
    example = episode(make_episode, 5, 1, 3, 32)
    # with the exporter's own option (torch.onnx passes it): torch 2.11 cannot prove the
    # guard min(way, h·w·way) == way that viewing the kernel-1 matmul adds, and without the
    # option fails on it; torch 2.13 proves it either way
    program = torch.export.export(graph, example, dynamic_shapes={
        "support": {0: shots}, "support_labels": {0: shots, 1: way}, "query": {0: queries}},
        **DEFERRED_ASSERTS)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("dmf.deform_conv2d.default") == 1
    assert not [t for t in targets if any(word in t for word in ("bmm", "unfold", "im2col"))]
    exported = program.module()
    for size in [(3, 2, 4, 32), (7, 1, 1, 32)]:
        inputs = episode(make_episode, *size, seed=9)
        with torch.no_grad():
            assert_same_scores(exported(*inputs), model(*inputs))


@pytest.mark.skipif(TORCH < (2, 11), reason="torch.export before 2.11 cannot prove a dynamic h "
                    "keeps 640·h·h within int32 (seen on 2.8 and 2.10)")
def test_exported_head_has_dynamic_support_way_queries_and_feature_size(dmf, make_episode):
    model, graph = dmf(64, 3)
    shots, way, queries = Dim("S", min=1), Dim("way", min=1), Dim("Q", min=1)
    side = Dim("h", min=1)
    support, labels, query = episode(make_episode, 5, 1, 3, 32)
    with torch.no_grad():
        example = (model.base(support), labels, model.base(query))
    exported = torch.export.export(graph.head, example, dynamic_shapes={
        "support_features": {0: shots, 2: side, 3: side}, "support_labels": {0: shots, 1: way},
        "query_features": {0: queries, 2: side, 3: side}}).module()
    support, labels, query = episode(make_episode, 2, 3, 5, 36, seed=12)  # 5×5 features
    with torch.no_grad():
        features = (model.base(support), labels, model.base(query))
        assert_same_scores(exported(*features), model.head(*features))


@pytest.mark.cuda  # dmf::deform_conv2d has float16 kernels on CUDA only
def test_half_precision_copy_runs_close_to_eager_model(dmf, make_episode):
    model, graph = dmf(64, 3)
    half = copy.deepcopy(graph).half().cuda()
    inputs = episode(make_episode, 5, 1, 3, 32, seed=10)
    with torch.no_grad():
        scores = half(*(tensor.half().cuda() for tensor in inputs))
        expected = model(*inputs)
    assert scores.dtype == torch.float16 and scores.is_cuda
    torch.testing.assert_close(scores.float().cpu(), expected, rtol=1e-2,
                               atol=1e-2 * expected.abs().max().item())


# -- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("solver, steps", [("dopri5", 1), ("rk4", 0)])
def test_bad_solver_or_steps_is_a_clear_error(dmf, solver, steps):
    model, _ = dmf(64, 1)
    with pytest.raises(DMFExportError):
        build_episode_graph(model, solver=solver, steps=steps)


def test_not_a_dmf_model_is_a_clear_error():
    with pytest.raises(DMFExportError, match="not a DMF model"):
        build_episode_graph(nn.Linear(2, 2))


MISMATCHES = {
    "labels-rows": (lambda s, l, q: (s, l[:-1], q), "support_labels"),
    "labels-1d": (lambda s, l, q: (s, l.argmax(1).float(), q), "support_labels"),
    "image-sizes": (lambda s, l, q: (s, l, q[:, :, :-4, :-4]), "differ in size"),
    "not-images": (lambda s, l, q: (s[0], l, q), r"\[N, 3, H, W\]"),
}


@pytest.fixture(scope="module")
def default_graphs(dmf):
    """The default configuration's graph, eager and scripted."""
    graph = dmf(64, 1)[1]
    return graph, torch.jit.script(graph)


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_mismatched_inputs_are_rejected_eager_and_scripted(default_graphs, make_episode, mismatch):
    corrupt, message = MISMATCHES[mismatch]
    inputs = corrupt(*episode(make_episode, 5, 1, 2, 32))
    for module in default_graphs:
        with pytest.raises((ValueError, RuntimeError, torch.jit.Error), match=message):
            module(*inputs)


@pytest.mark.parametrize("config, weight_first", [((64, 1), True), ((640, 1), False), ((64, 3), False)],
                         ids=["G64K1", "G640K1", "G64K3"])
def test_meta_filter_weights_first_only_when_that_samples_fewer_channels(dmf, config, weight_first):
    # 9·G·K sampled channels per pair instead of 640·9: worth it only for 9·G·K ≤ 640;
    # the parity tests above cover both paths
    model, graph = dmf(*config)
    assert graph.head.meta_filter.weight_first is weight_first
