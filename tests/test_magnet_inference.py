"""The optimised MagNet inference against a straightforward implementation of the same method.

``reference_inference`` below is MagNet written out as plainly as possible: at every scale it upsamples the
previous prediction to a full canvas, refines each chosen patch one at a time (its coarse input sampled
from the previous prediction, as in training), pastes refined
probabilities and query scores onto full-canvas sums with ``paste_weight``, sorts the whole scale's query map
to take the top-k points (stable: ties in raster order) and replaces them with ``torch.where`` over the
canvas. ``magnet.progressive_inference`` gets there with crops straight from the window, accumulation inside
the patches' boxes, one ``kthvalue`` over the covered pixels, in-place replacement and batched patches; both
must give the same labels, the same replaced points and the same probabilities.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_uhrseg.methods import magnet as mg

torch.set_num_threads(1)


class ConvBackbone(nn.Module):
    """A small deterministic 3×3-conv backbone (any input size)."""

    def __init__(self, num_classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, padding=1))

    def forward(self, x):
        return 4 * self.body(x)


def random_net(num_classes: int = 4, seed: int = 0) -> mg.MagNetNet:
    net = mg.MagNetNet(ConvBackbone(num_classes, seed), num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.refiner.modules():  # non-trivial BatchNorm statistics, so the refiner is not near identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


@torch.no_grad()
def reference_inference(net, rgb: np.ndarray, schedule: mg.Schedule):
    """MagNet, the plain way (see the module docstring). Returns probabilities and the replaced masks."""
    pixels = mg.WindowPixels(rgb)
    shape = pixels.shape
    scales = mg._scale_shapes(shape, schedule)
    crop = scales[0]
    model_input = mg._input_shape(crop, schedule)
    border = round(schedule.border_fraction * min(crop))
    probabilities = mg.resize_maps(net.segment(pixels.read([(0, 0, *shape)], model_input))[0], crop)
    replaced_masks = []
    for scale in scales[1:]:
        boxes = mg.patch_boxes(scale, crop)
        # rank the patches: mean uncertainty of the previous prediction over each patch's footprint
        uncertainty = 1 - mg.certainty(probabilities[None])[0]
        fy, fx = probabilities.shape[1] / scale[0], probabilities.shape[2] / scale[1]
        scores = []
        for y0, x0, y1, x1 in boxes:
            a, b = round(y0 * fy), round(x0 * fx)
            scores.append(float(uncertainty[a : max(a + 1, round(y1 * fy)), b : max(b + 1, round(x1 * fx))].mean()))
        ranked = sorted(range(len(boxes)), key=lambda i: -scores[i])
        keep = sorted(ranked if schedule.n_patches < 0 else ranked[: schedule.n_patches])  # pasted in grid order

        previous = mg.resize_maps(probabilities, scale)
        refined_sum = torch.zeros_like(previous)
        query_sum = torch.zeros(scale)
        weight = torch.zeros(scale)
        wy, wx = shape[0] / scale[0], shape[1] / scale[1]
        for i in keep:
            y0, x0, y1, x1 = boxes[i]
            window_box = (round(y0 * wy), round(x0 * wx), round(y1 * wy), round(x1 * wx))
            fine = net.segment(pixels.read([window_box], model_input))
            coarse = mg.crop_probabilities(probabilities, boxes[i], scale, model_input)[None]
            refined = torch.softmax(net.refine(coarse, fine), dim=1)
            query = mg.query_score(refined, coarse, schedule.median_kernel)
            w = mg.paste_weight(boxes[i], scale, border)
            refined_sum[:, y0:y1, x0:x1] += mg.resize_maps(refined[0], (y1 - y0, x1 - x0)) * w
            query_sum[y0:y1, x0:x1] += mg.resize_maps(query[0], (y1 - y0, x1 - x0)) * w
            weight[y0:y1, x0:x1] += w
        covered = weight > 0
        query_map = torch.where(covered, query_sum / weight.clamp(min=1e-12), torch.tensor(float("-inf")))
        k = min(mg.points_to_replace(schedule.n_points, scale[0] * scale[1], len(keep), len(boxes)),
                int(covered.sum()))
        order = torch.sort(query_map.flatten(), descending=True, stable=True).indices[:k]
        replaced = torch.zeros(scale[0] * scale[1], dtype=torch.bool)
        replaced[order] = True
        replaced = replaced.view(scale)
        probabilities = torch.where(replaced[None], refined_sum / weight.clamp(min=1e-12), previous)
        replaced_masks.append(replaced)
    return mg.resize_maps(probabilities, shape), replaced_masks


@pytest.mark.parametrize("fast", [False, True], ids=["magnet", "magnet-fast"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_optimised_inference_gives_the_reference_labels(fast, batch_size):
    # 90 × 100 px: scales 22×25, 45×50, 90×100 with 22×25 crops, so the 3×2 and 5×4 grids overlap; a 2 px
    # border is left out of every inner patch side; model input 0.6 of the crop; median kernel 3.
    schedule = mg.Schedule("t", (0.25, 0.5, 1.0), 0.6, n_patches=3 if fast else -1,
                           n_points=0.9 if fast else 0.75, median_kernel=3, border_fraction=0.1)
    rgb = np.random.default_rng(7).integers(0, 255, (90, 100, 3), dtype=np.uint8)
    rgb[20:60, 30:80] //= 3  # some structure for the backbone to be unsure about
    net = random_net()
    expected, expected_replaced = reference_inference(net, rgb, schedule)
    got, stages = mg.progressive_inference(net, rgb, schedule, batch_size=batch_size)
    assert [s["scale"] for s in stages] == [(22, 25), (45, 50), (90, 100)]
    for st, rep in zip(stages[1:], expected_replaced):
        assert 0 < int(rep.sum()) < rep.numel()  # a real choice was made at every scale
        assert torch.equal(st["replaced"], rep)
    np.testing.assert_array_equal(got.argmax(0).numpy(), expected.argmax(0).numpy())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    selected = [sum(p["selected"] for p in st["patches"]) for st in stages[1:]]
    assert selected == ([3, 3] if fast else [6, 20])


@pytest.mark.parametrize("fast", [False, True], ids=["magnet", "magnet-fast"])
@pytest.mark.parametrize("size", [(96, 128), (90, 100)], ids=["whole-multiples", "overlapping-patches"])
def test_stage_artefacts_from_the_parts_match_the_full_maps(size, fast):
    # predict() keeps only the pasted parts of each stage; its coarse maps must be those of the scale-sized
    # maps. 96 × 128: scales 24×32, 48×64, 96×128, whole multiples of the map (block sums); 90 × 100:
    # overlapping patches and scales that are not (through a scale-sized map).
    schedule = mg.Schedule("t", (0.25, 0.5, 1.0), 0.6, n_patches=3 if fast else -1,
                           n_points=0.9 if fast else 0.75, median_kernel=3, border_fraction=0.1)
    rgb = np.random.default_rng(11).integers(0, 255, (*size, 3), dtype=np.uint8)
    rgb[20:60, 30:80] //= 3
    net = random_net(seed=2)
    probs, full = mg.progressive_inference(net, rgb, schedule, full_maps=True)
    probs_parts, lean = mg.progressive_inference(net, rgb, schedule, full_maps=False)
    torch.testing.assert_close(probs_parts, probs, atol=0, rtol=0)
    assert all("query_map" not in st and "replaced" not in st for st in lean[1:])
    map_shape = tuple(full[0]["scale"])
    expected = mg.stage_artefacts(full, size, map_shape)
    got = mg.stage_artefacts(lean, size, map_shape)
    for e, g in zip(expected, got, strict=True):
        assert g["n_replaced"] == e["n_replaced"] and (g["stage"] == 0 or g["n_replaced"] > 0)
        np.testing.assert_allclose(g["query_map"], e["query_map"], atol=1e-5, rtol=0)
        if e["replaced"] is None:
            assert g["replaced"] is None
        else:
            np.testing.assert_allclose(g["replaced"], e["replaced"], atol=1e-5, rtol=0)
            assert 0 < g["replaced"].max() <= 1
        assert g["patches"] == e["patches"]


def test_top_k_mask_takes_ties_in_raster_order():
    q = torch.tensor([[0.5, 0.9, 0.5], [0.5, 0.1, 0.5], [0.9, 0.5, 0.2]])
    covered = torch.ones(3, 3, dtype=torch.bool)
    covered[0, 2] = False  # not covered: never chosen, whatever its score
    mask = mg.top_k_mask(q, covered, 4)
    # 0.9, 0.9, then the first two 0.5s in raster order among the covered pixels
    expected = torch.tensor([[True, True, False], [True, False, False], [True, False, False]])
    assert torch.equal(mask, expected)
    assert torch.equal(mg.top_k_mask(q, covered, 100), covered)
    assert not mg.top_k_mask(q, covered, 0).any()


def test_certainty_equals_top1_minus_top2_on_a_canvas():
    p = torch.softmax(torch.randn(7, 130, 90) * 3, dim=0)
    top2 = p.topk(2, dim=0).values
    torch.testing.assert_close(mg.certainty_map(p), top2[0] - top2[1], atol=0, rtol=0)
    torch.testing.assert_close(mg.certainty(p[None]), (top2[0] - top2[1])[None], atol=0, rtol=0)


def test_certainty_map_on_uneven_bands_matches_topk():
    p = torch.softmax(torch.randn(7, 1031, 70) * 3, dim=0)  # 1031 rows: a short last band
    top2 = p.topk(2, dim=0).values
    torch.testing.assert_close(mg.certainty_map(p), top2[0] - top2[1], atol=0, rtol=0)


def test_uncertainty_map_is_one_minus_certainty_exactly():
    p = torch.softmax(torch.randn(7, 1031, 70) * 3, dim=0)
    top2 = p.topk(2, dim=0).values
    torch.testing.assert_close(mg.uncertainty_map(p), 1 - (top2[0] - top2[1]), atol=0, rtol=0)
    torch.testing.assert_close(mg.uncertainty_map(p), mg.certainty_map(p, rows=64).neg_().add_(1), atol=0, rtol=0)
    assert torch.equal(mg.uncertainty_map(torch.ones(1, 5, 5)), torch.zeros(5, 5))  # one class: sure


def test_top_k_threshold_and_count_match_torch():
    values = torch.rand(10_001)
    values[::7] = 0.5  # ties
    for k in (1, 17, 5000, 10_001):
        assert float(mg.kth_largest(values, k)) == float(values.kthvalue(values.numel() - k + 1).values)
    mask = values > 0.5
    assert mg.count_true(mask) == int(mask.sum()) and mg.count_true(torch.zeros(3, dtype=torch.bool)) == 0


def test_resize_maps_is_bilinear_with_aligned_pixel_centres():
    x = torch.rand(3, 20, 30)
    expected = torch.nn.functional.interpolate(x[None], size=(47, 61), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(mg.resize_maps(x, (47, 61)), expected, atol=1e-4, rtol=0)
    shrunk = torch.nn.functional.interpolate(x[None], size=(7, 9), mode="bilinear", align_corners=False,
                                             antialias=True)[0]
    torch.testing.assert_close(mg.resize_maps(x, (7, 9)), shrunk)


def test_window_pixels_read_the_window_region_resampled():
    rgb = np.random.default_rng(3).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    pixels = mg.WindowPixels(rgb)
    got = pixels.read([(8, 16, 40, 48), (0, 0, 64, 80)], (16, 16))
    assert got.shape == (2, 3, 16, 16) and got.dtype == torch.float32
    region = mg.to_tensor(rgb)[None, :, 8:40, 16:48]
    expected = torch.nn.functional.interpolate(region, size=(16, 16), mode="bilinear", align_corners=False,
                                               antialias=True)
    torch.testing.assert_close(got[:1], expected, atol=1.5 / 255, rtol=0)  # uint8 resampling rounds
    np.testing.assert_array_equal(pixels.read([(3, 5, 9, 12)], (6, 7))[0].numpy(),
                                  mg.to_tensor(rgb)[:, 3:9, 5:12].numpy())  # same size: the pixels themselves
    with pytest.raises(ValueError, match="uint8"):
        mg.WindowPixels(rgb.astype(np.float32))


def test_inference_net_matches_the_network_and_follows_its_weights():
    torch.manual_seed(0)
    net = mg.MagNetNet(ConvBackbone(5, 1), 5).eval()
    fast = mg.InferenceNet(net)
    coarse = torch.softmax(torch.randn(2, 5, 128, 128), 1)  # 128² and more: the scripted, frozen refiner
    fine = torch.softmax(torch.randn(2, 5, 128, 128), 1)
    images = torch.rand(2, 3, 40, 50)
    with torch.inference_mode():
        torch.testing.assert_close(fast.refine(coarse, fine), net.refine(coarse, fine), atol=1e-4, rtol=0)
        torch.testing.assert_close(fast.segment(images), net.segment(images), atol=1e-5, rtol=0)
        before = fast.refine(coarse, fine)
    with torch.no_grad():  # the network is trained further in the same process
        net.refiner.classify.weight.mul_(-1)
    with torch.inference_mode():
        after = fast.refine(coarse, fine)
        torch.testing.assert_close(after, net.refine(coarse, fine), atol=1e-4, rtol=0)
    assert not torch.allclose(after, before, atol=1e-3)


def test_inference_net_folds_the_real_backbone_without_changing_it():
    net = mg.build_net(3, "fast", pretrained=False).eval()
    for m in net.backbone.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    images = torch.rand(2, 3, 96, 64)
    with torch.inference_mode():
        torch.testing.assert_close(mg.InferenceNet(net).segment(images), net.segment(images), atol=1e-4, rtol=0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.backbone.branch.backbone.modules())  # net untouched


@pytest.mark.parametrize("k", [1, 37, 150, 263])
def test_top_k_over_refined_patches_equals_top_k_over_the_canvas(k):
    """Overlapping patch boxes and many ties (scores on a coarse grid of values): the per-patch selection picks
    the same pixels as ``top_k_mask`` over the whole canvas."""
    g = torch.Generator().manual_seed(k)
    shape = (20, 30)
    q = torch.randint(0, 4, shape, generator=g).float() / 4
    inner = {0: (0, 0, 12, 14), 2: (8, 10, 20, 25), 5: (2, 20, 9, 30)}
    covered = torch.zeros(shape, dtype=torch.bool)
    for y0, x0, y1, x1 in inner.values():
        covered[y0:y1, x0:x1] = True
    pasted = {i: (torch.zeros(1, b[2] - b[0], b[3] - b[1]), q[b[0]:b[2], b[1]:b[3]].clone()) for i, b in inner.items()}
    parts = mg._average_pasted(inner, pasted)  # equal scores on overlaps: the average is the score itself
    masks = mg._top_k_in_parts(parts, k, shape[1])
    got = torch.zeros(shape, dtype=torch.bool)
    for (box, _, _, _), m in zip(parts, masks):
        got[box[0]:box[2], box[1]:box[3]] = m
    assert torch.equal(got, mg.top_k_mask(q, covered, k))
    assert int(got.sum()) == min(k, int(covered.sum()))
