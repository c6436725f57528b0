"""check_episode: the episodes the original would turn into garbage are refused, each with
one line naming the input; a proper episode (in any floating dtype) passes."""
from __future__ import annotations

import pytest
import torch

from dmf_export.contract import (
    HEAD_INPUTS, EpisodeSize, check_episode, check_images, dynamic_axes, episode_shapes, feature_size,
    tensor_dims,
)
from dmf_export.errors import DMFExportError

SIZE = 8  # hand-made episodes: 8×8 images are enough for every check


def episode(way=3, shot=2, queries=4, size=SIZE, dtype=torch.float32):
    """Support in class order 0,1,2,0,1,2 (one-hot by hand), queries; all finite."""
    labels = torch.zeros(way * shot, way, dtype=dtype)
    for row in range(way * shot):
        labels[row, row % way] = 1
    support = torch.linspace(-2, 2, way * shot * 3 * size * size).reshape(way * shot, 3, size, size)
    query = torch.linspace(2, -2, queries * 3 * size * size).reshape(queries, 3, size, size)
    return support.to(dtype), labels, query.to(dtype)


def refused(support, labels, query, **options):
    options.setdefault("image_size", SIZE)
    options.setdefault("precision", "fp32")
    with pytest.raises(DMFExportError) as err:
        check_episode(support, labels, query, **options)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_proper_episode_passes_and_returns_nothing():
    assert check_episode(*episode(), image_size=SIZE, precision="fp32") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_any_floating_dtype_passes_for_the_runner_to_cast(dtype):
    # fp16 into an fp32 artifact is exact; the runner casts (documented choice)
    assert check_episode(*episode(dtype=dtype), image_size=SIZE, precision="fp32") is None
    assert check_episode(*episode(dtype=dtype), image_size=SIZE, precision="fp16") is None


def test_integer_and_boolean_one_hot_labels_pass():
    support, labels, query = episode()
    for as_type in (torch.int64, torch.bool):
        check_episode(support, labels.to(as_type), query, image_size=SIZE, precision="fp32")


def test_way_1_shot_1_query_1_passes():
    check_episode(*episode(way=1, shot=1, queries=1), image_size=SIZE, precision="fp32")


def test_no_image_size_accepts_any_size():
    check_episode(*episode(size=5), image_size=None, precision="fp32")


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan"), float("inf")])
def test_label_values_other_than_0_and_1(value):
    support, labels, query = episode()
    labels[4, 2] = value
    message = refused(support, labels, query)
    assert message.startswith("support_labels is not one-hot: row 4 holds ")
    assert "only 0 and 1" in message


def test_a_row_with_two_classes():
    support, labels, query = episode()
    labels[1, 0] = 1  # row 1 is class 1 and class 0
    assert refused(support, labels, query) == "support_labels is not one-hot: row 1 sums to 2, not 1"


def test_a_row_with_no_class():
    support, labels, query = episode()
    labels[3] = 0
    assert refused(support, labels, query) == "support_labels is not one-hot: row 3 sums to 0, not 1"


def test_a_class_with_no_support_image():
    support, labels, query = episode(way=3, shot=1)
    labels = torch.cat([labels, torch.zeros(3, 2)], 1)  # way 5: classes 3 and 4 have none
    assert refused(support, labels, query) == (
        "support_labels: classes 3, 4 have no support image; the original divides by "
        "each class's count (NaN scores)")
    labels = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)
    assert refused(support, labels, query).startswith("support_labels: class 3 has no support")


def test_labels_with_no_columns():
    support, _, query = episode()
    assert "support_labels is not one-hot: row 0 sums to 0" in refused(
        support, torch.zeros(6, 0), query)


def test_support_and_label_rows_differ():
    support, labels, query = episode()
    assert refused(support[:5], labels, query) == (
        "support_labels has 6 rows but support has 5 images (one row per support image)")


def test_class_indices_instead_of_one_hot():
    support, _, query = episode()
    assert refused(support, torch.tensor([0, 1, 2, 0, 1, 2]), query) == (
        "support_labels must be one-hot [S, way], got shape [6] (class indices? give one-hot rows)")


@pytest.mark.parametrize("which", ["support", "query"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels(which, value):
    support, labels, query = episode()
    images = support if which == "support" else query
    images[2, 1, 3, 4] = value
    images[3, 0, 0, 0] = value
    assert refused(support, labels, query) == (
        f"{which} has NaN or Inf values (image 2 is the first of 2)")


def test_values_beyond_float16_for_an_fp16_artifact():
    support, labels, query = episode()
    query[0, 0, 0, 0] = 70000.0
    check_episode(support, labels, query, image_size=SIZE, precision="fp32")  # fine in fp32
    assert refused(support, labels, query, precision="fp16") == (
        "query holds 7e+04, beyond fp16's range (65504): the artifact would see Inf")


@pytest.mark.parametrize("which", ["support", "query"])
def test_wrong_image_size(which):
    support, labels, query = episode()
    if which == "support":
        support = support[:, :, :, :7]
    else:
        query = torch.zeros(4, 3, 16, 16)
    shown = "8×7" if which == "support" else "16×16"
    assert refused(support, labels, query) == (
        f"{which} is {shown}, expected 8×8 (the artifact's image size)")


@pytest.mark.parametrize("channels", [1, 4])
def test_wrong_channel_count(channels):
    support, labels, query = episode()
    query = torch.zeros(4, channels, SIZE, SIZE)
    assert refused(support, labels, query) == (
        f"query has {channels} channels, expected 3 (shape [4, {channels}, 8, 8], [N, 3, H, W])")


@pytest.mark.parametrize("shape", [(3, SIZE, SIZE), (1, 6, 3, SIZE, SIZE)])
def test_wrong_rank(shape):
    _, labels, query = episode()
    message = refused(torch.zeros(shape), labels, query)
    assert message == f"support must be [N, 3, H, W], got shape {list(shape)} ({len(shape)}-D)"


def test_labels_of_the_wrong_rank():
    support, labels, query = episode()
    assert "support_labels must be one-hot [S, way], got shape [1, 6, 3]" in refused(
        support, labels[None], query)


def test_integer_pixels_are_refused():
    support, labels, query = episode()
    assert refused((support * 100).to(torch.uint8), labels, query) == (
        "support is uint8: expected floating-point images, normalised (mean/std) outside "
        "the network")


def test_empty_query():
    support, labels, _ = episode()
    assert refused(support, labels, torch.zeros(0, 3, SIZE, SIZE)) == (
        "query is empty: at least one image is needed")


def test_not_a_tensor():
    support, labels, query = episode()
    assert refused(support.numpy(), labels, query) == (
        "support must be a tensor [N, 3, H, W], got ndarray")
    assert refused(support, labels.tolist(), query) == (
        "support_labels must be a one-hot tensor [S, way], got list")


def test_split_head_inputs_are_named_as_the_head_names_them():
    support = torch.zeros(2, 640, 11, 11)
    labels = torch.eye(2)
    query = torch.zeros(1, 640, 11, 12)
    with pytest.raises(DMFExportError, match=r"^query_features is 11×12, expected 11×11"):
        check_episode(support, labels, query, image_size=11, precision="fp32", channels=640,
                      names=HEAD_INPUTS)


def test_encoder_images_alone():
    check_images(torch.zeros(5, 3, SIZE, SIZE), image_size=SIZE)
    with pytest.raises(DMFExportError, match=r"^images has NaN or Inf values \(image 4"):
        check_images(torch.full((5, 3, SIZE, SIZE), 0.0).index_fill_(0, torch.tensor([4]),
                                                                     float("nan")),
                     image_size=SIZE)


def test_unknown_precision_is_a_programming_error():
    with pytest.raises(ValueError, match="precision"):
        check_episode(*episode(), image_size=SIZE, precision="int4")  # int8 is a precision now (ONNX)


def test_what_the_checks_spare_the_user(dmf_state_dict):
    # the independent reference of the original: a class with no support image gives its
    # scores as NaN (0 / 0 prototype), which check_episode refuses up front
    from reference_dmf import dmf_reference

    support, labels, query = episode(way=2, shot=1, queries=1, size=16)
    state = dmf_state_dict(64, 1)
    no_support = torch.cat([labels, torch.zeros(2, 1)], 1)
    assert dmf_reference(state, support, no_support, query, 64, 1)[0, 2].isnan()
    refused(support, no_support, query, image_size=16)
    assert dmf_reference(state, support, labels, query, 64, 1).isfinite().all()


def test_feature_size_is_three_ceil_mode_halvings():
    # 84 → 42 → 21 → 11; 32 → 16 → 8 → 4; 85 → 43 → 22 → 11; 1 stays 1
    assert [feature_size(s) for s in (84, 32, 85, 1)] == [11, 4, 11, 1]


def test_tensor_dims_mark_the_dynamic_axes_and_fill_in_the_sizes():
    assert tensor_dims("episode", 84) == {"support": [-1, 3, 84, 84], "support_labels": [-1, -1],
                                          "query": [-1, 3, 84, 84], "scores": [-1, -1]}
    assert tensor_dims("encoder", 32) == {"images": [-1, 3, 32, 32], "features": [-1, 640, 4, 4]}
    assert tensor_dims("head", 84)["query_features"] == [-1, 640, 11, 11]


def test_dynamic_axes_share_names_across_a_graphs_inputs():
    assert dynamic_axes("episode") == {"support": {0: "S"}, "support_labels": {0: "S", 1: "way"},
                                       "query": {0: "Q"}}
    assert dynamic_axes("encoder") == {"images": {0: "N"}}
    assert dynamic_axes("head") == {"support_features": {0: "S"}, "support_labels": {0: "S", 1: "way"},
                                    "query_features": {0: "Q"}}


def test_episode_shapes_follow_the_episode_size():
    # 3-way 2-shot: S = 6 support images; 4 queries
    assert episode_shapes(EpisodeSize(3, 2, 4), 32) == {
        "support": (6, 3, 32, 32), "support_labels": (6, 3), "query": (4, 3, 32, 32)}
