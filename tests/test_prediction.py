"""Tests of prediction.sliding_window: equal to MONAI's sliding_window_inference (the field's reference,
a test-only dependency) on the same predictor and volume, one worked example, the batches it predicts in,
and one-line errors for bad arguments. (predict_folder is tested end to end in test_eval.py.)

Two predictors: a seeded conv net (zero padding at the window's faces, so its output depends on where
the window lies), and `position_code`, cheap enough to run the whole grid of modes, overlaps and batch
sizes, whose output encodes each voxel's place in its window and the window's mean, so a window moved
by one voxel, dropped, or weighted wrongly changes the result by far more than the tolerance.
"""
import pytest
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from llm4seg.prediction import sliding_window, window_weight

# sliding_window cuts, weights and sums the windows in MONAI's order, so the two agree to the bit wherever
# predict sees the same memory: max |diff| 0.0. At sw_batch_size 1 MONAI hands predict a strided view of
# the volume, ours a contiguous copy, and position_code's window mean sums in another order: up to 4.8e-7,
# 2 float32 ulps of that channel (values up to ~3). 1e-6 is ~4 such ulps; a misplaced or misweighted
# window moves the outputs by > 1 (test_a_misplaced_window_shows).
TOL = 1e-6

ODD_3D = (37, 50, 29)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Windows of 16^3 voxels are too small to share among threads: on 2 cores beside another busy
    process, two OpenMP threads made a conv net's windows ~20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def position_code(windows: torch.Tensor) -> torch.Tensor:
    """windows (B, C, *roi) -> (B, 3, *roi): channel 0 the first input channel times the voxel's place in
    its window (a ramp over the axes), 1 the window's mean plus the ramp, 2 the last channel squared."""
    roi = windows.shape[2:]
    ramp = sum(torch.arange(r, dtype=windows.dtype).view(-1, *[1] * (len(roi) - 1 - i)) / r
               for i, r in enumerate(roi))                                                   # (*roi)
    mean = windows.mean(dim=tuple(range(1, windows.dim())), keepdim=True)                   # (B, 1, 1, ...)
    return torch.stack([windows[:, 0] * ramp, (mean + ramp)[:, 0].expand_as(windows[:, 0]), windows[:, -1] ** 2], 1)


def conv_net(dims: int, seed: int = 0) -> torch.nn.Module:
    """A seeded 2-layer conv net, C = 2 -> K = 3 channels, zero-padded."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(2, 4, 3, padding=1), torch.nn.Tanh(), conv(4, 3, 3, padding=1)).eval()


def volume(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def monai(predict, x, roi, overlap, mode, sw_batch_size, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return sliding_window_inference(x, roi, sw_batch_size, predict, overlap, mode, **kwargs)


def max_diff(predict, x, roi, overlap, mode, sw_batch_size) -> float:
    ours = sliding_window(predict, x, roi, overlap, mode, sw_batch_size)
    theirs = monai(predict, x, roi, overlap, mode, sw_batch_size)
    assert ours.shape == theirs.shape == (x.shape[0], 3, *x.shape[2:]) and ours.dtype == torch.float32
    return (ours - theirs).abs().max().item()


# --- equal to MONAI ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sw_batch_size", [1, 3])
@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_equals_monai_3d_odd_sizes(mode, overlap, sw_batch_size):
    """37 x 50 x 29 with roi 16: no axis a multiple of the step, so every axis's last window is moved back."""
    assert max_diff(position_code, volume(1, 2, *ODD_3D), 16, overlap, mode, sw_batch_size) <= TOL


@pytest.mark.parametrize("mode, overlap, sw_batch_size", [("constant", 0.25, 1), ("gaussian", 0.5, 3)])
def test_equals_monai_3d_conv_net(mode, overlap, sw_batch_size):
    assert max_diff(conv_net(3), volume(1, 2, *ODD_3D), 16, overlap, mode, sw_batch_size) <= TOL


@pytest.mark.parametrize("sw_batch_size", [1, 3])
@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_equals_monai_2d(mode, overlap, sw_batch_size):
    """Two images (N = 2, so a batch can hold windows of both), a conv net, a window of 16 x 12."""
    assert max_diff(conv_net(2), volume(2, 2, 37, 50), (16, 12), overlap, mode, sw_batch_size) <= TOL


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("shape, roi", [((1, 2, 37, 50, 11), 16),        # 5 short: 2 before, 3 after
                                        ((1, 2, 9, 10, 29), 16),         # two axes short, one slides
                                        ((2, 2, 9, 50), (16, 12))])      # 2D
def test_pads_an_axis_shorter_than_the_window(shape, roi, mode):
    assert max_diff(position_code, volume(*shape), roi, 0.5, mode, 3) <= TOL
    assert max_diff(conv_net(len(shape) - 2), volume(*shape), roi, 0.5, mode, 3) <= TOL


def test_equals_monai_per_axis_roi_overlap_and_sigma():
    x, roi, overlap = volume(1, 2, *ODD_3D), (16, 12, 8), (0.25, 0.5, 0.75)
    ours = sliding_window(position_code, x, roi, overlap, "gaussian", 4, sigma_scale=(0.125, 0.25, 0.05))
    theirs = monai(position_code, x, roi, overlap, "gaussian", 4, sigma_scale=(0.125, 0.25, 0.05))
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("sigma_scale", [0.125, 0.05])   # 0.05: most of the window at the 1e-3 floor
def test_window_weight_is_monais_importance_map(sigma_scale):
    for mode in ("constant", "gaussian"):
        ours = window_weight((16, 12, 7), mode, (sigma_scale,) * 3, "cpu")
        assert torch.equal(ours, compute_importance_map((16, 12, 7), mode, sigma_scale))


def test_a_misplaced_window_shows():
    """The comparison can fail: MONAI with the windows placed otherwise (another overlap, another roi)
    or weighted otherwise differs from ours by far more than TOL (by 1.6 .. 2.3 here)."""
    x = volume(1, 2, *ODD_3D)
    ours = sliding_window(position_code, x, 16, 0.5, "gaussian", 4)
    for roi, overlap, mode in ((16, 0.25, "gaussian"), (15, 0.5, "gaussian"), (16, 0.5, "constant")):
        assert (ours - monai(position_code, x, roi, overlap, mode, 4)).abs().max().item() > 1e-2


# --- a worked example, batches, devices and dtypes -----------------------------------------------------

def test_known_answer_last_window_moved_back():
    """One row of 7 pixels, windows of 4, overlap 0.5: step int(4 * 0.5) = 2, windows start at 0, 2 and
    4 -> moved back to 7 - 4 = 3. predict returns each pixel's place in its window (0, 1, 2, 3), so
    pixel 3 is covered at places 3 (window 0), 1 (window 2) and 0 (window 3): (3 + 1 + 0) / 3 = 4/3.
        pixel     0  1  2          3          4          5          6
        places    0  1  2,0        3,1,0      2,1        3,2        3
        average   0  1  1          4/3        1.5        2.5        3"""
    place = lambda windows: torch.arange(4.0).expand(windows.shape[0], 1, 1, 4)  # noqa: E731
    out = sliding_window(place, torch.zeros(1, 1, 1, 7), (1, 4), 0.5, "constant", 1)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0, 1, 1, 4 / 3, 1.5, 2.5, 3]), atol=1e-6)


def test_predicts_in_batches_of_sw_batch_size():
    """37 x 50 x 29, roi 16, overlap 0.5 (step 8): 4 x 6 x 3 = 72 windows per volume (37: starts 0, 8, 16,
    21; 50: 0 .. 32, 34; 29: 0, 8, 13), 144 for two volumes: 28 batches of 5 and one of 4."""
    sizes = []

    def predict(windows):
        sizes.append(windows.shape[0])
        return position_code(windows)
    sliding_window(predict, volume(2, 2, *ODD_3D), 16, 0.5, "constant", 5)
    assert sizes == [5] * 28 + [4]


def test_accumulates_where_asked_in_float32_at_least():
    x = volume(1, 2, 20, 18, 17)
    half = sliding_window(lambda w: position_code(w).bfloat16(), x, 16, 0.5, "gaussian", 4, accumulate_device="cpu",
                          device="cpu", progress=False)
    assert half.dtype == torch.float32 and half.device.type == "cpu"
    assert sliding_window(position_code, x.double(), 16, 0.5, "gaussian", 4).dtype == torch.float64


# --- bad arguments: one line naming the value and what is expected -------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(roi_size=0), ["roi_size", "positive", "0"]),
    (dict(roi_size=(16, -1, 16)), ["roi_size", "positive", "(16, -1, 16)"]),
    (dict(roi_size=(16, 16)), ["roi_size", "3 (one per spatial axis)", "(16, 16)"]),
    (dict(overlap=1.0), ["overlap", "[0, 1)", "1.0"]),
    (dict(overlap=-0.25), ["overlap", "[0, 1)", "-0.25"]),
    (dict(mode="average"), ["mode", "constant, gaussian", "'average'"]),
    (dict(sw_batch_size=0), ["sw_batch_size", ">= 1", "0"]),
    (dict(volume=torch.zeros(2, 20, 20)), ["volume", "(N, C, D, H, W)", "(2, 20, 20)"]),
    (dict(predict=lambda w: position_code(w)[..., :-1]), ["predict", "(4, K, 16, 16, 16)", "(4, 3, 16, 16, 15)"]),
    (dict(predict=lambda w: position_code(w)[:1]), ["predict", "(4, K, 16, 16, 16)", "(1, 3, 16, 16, 16)"]),
    (dict(predict=lambda w: w.numpy()), ["predict", "(4, K, 16, 16, 16)", "ndarray"]),
])
def test_bad_arguments_are_one_line_value_errors(kwargs, words):
    arguments = dict(predict=position_code, volume=volume(1, 2, 20, 18, 17), roi_size=16)
    with pytest.raises(ValueError) as error:
        sliding_window(**{**arguments, **kwargs})
    message = str(error.value)
    assert "\n" not in message and "expected" in message and all(word in message for word in words), message
