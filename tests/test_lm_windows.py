"""Training windows: inputs and next-token targets, the sampled tf.data stream, one-line errors."""
import numpy as np
import pytest

from pipeline.lm.windows import check_length, read_text, training_dataset, windows


def test_windows_targets_are_inputs_shifted_by_one():
    tokens = np.arange(20)
    x, y = windows(tokens, 4)
    assert x.shape == y.shape == (4, 4)
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x[:, 0], [0, 4, 8, 12])
    x, _ = windows(tokens, 4, stride=2)
    np.testing.assert_array_equal(x[:, 0], np.arange(0, 16, 2))


def test_training_dataset_samples_contiguous_windows():
    tokens = np.arange(50) * 3
    ds = training_dataset(tokens, 8, 5, seed=1)
    starts = set()
    for x, y in ds.take(20):
        x, y = x.numpy(), y.numpy()
        assert x.shape == y.shape == (5, 8) and x.dtype == np.int32
        np.testing.assert_array_equal(np.diff(x, axis=1), 3)  # contiguous pieces of the stream
        np.testing.assert_array_equal(y, x + 3)  # next tokens
        starts.update(x[:, 0] // 3)
    assert max(starts) <= 50 - 8 - 1 and len(starts) > 25  # every offset can start a window


def test_training_dataset_is_reproducible_by_seed():
    tokens = np.arange(100)
    first = [x.numpy() for x, _ in training_dataset(tokens, 4, 2, seed=7).take(3)]
    again = [x.numpy() for x, _ in training_dataset(tokens, 4, 2, seed=7).take(3)]
    np.testing.assert_array_equal(first, again)


def test_empty_and_short_texts_are_one_line_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt: empty text$"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=r"^short\.txt: 8 tokens, too short for one window of 8 \(\+1 target\)$"):
        check_length(list(range(8)), 8, "short.txt")
    with pytest.raises(ValueError, match="train.txt: empty text"):
        training_dataset([], 8, 2, name="train.txt")
    check_length(list(range(9)), 8, "ok.txt")
