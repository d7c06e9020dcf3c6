"""The one-line formatter every user-facing error goes through (pretrain.errors)."""

from pretrain.errors import one_line, os_reason


def test_a_worker_error_is_cut_to_its_original_message():
    wrapped = RuntimeError(
        "Caught FetchFailed in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "pretrain/data/fetch.py", line 1, in wait_ready\n'
        "pretrain.data.fetch.FetchFailed: data/a.npz: the shard fetcher stopped; see the error above")
    assert one_line(wrapped) == "data/a.npz: the shard fetcher stopped; see the error above"
    assert one_line(ValueError("--seq-len must be a positive integer, got 0")) == "--seq-len must be a positive integer, got 0"


def test_a_library_message_is_its_first_line_and_an_empty_one_its_type():
    assert one_line(RuntimeError("\n  first line\nsecond line\n")) == "first line"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ValueError("x" * 50), max_chars=10) == "xxxxxxx..."


def test_a_failed_write_is_told_in_the_system_words():
    assert os_reason(OSError(28, "No space left on device")) == "No space left on device"
    assert os_reason(RuntimeError("PytorchStreamWriter failed writing file data/0\nmore")) == (
        "PytorchStreamWriter failed writing file data/0")
