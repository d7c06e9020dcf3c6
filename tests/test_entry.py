"""The entry point's last line: an error raised inside a DataLoader worker is reported as its own one line."""

from train import one_line


def test_a_worker_error_is_cut_to_its_original_message():
    wrapped = RuntimeError(
        "Caught FetchFailed in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "pretrain/shard_fetch.py", line 1, in wait_ready\n'
        "pretrain.shard_fetch.FetchFailed: data/a.npz: the shard fetcher stopped; see the error above")
    assert one_line(wrapped) == "data/a.npz: the shard fetcher stopped; see the error above"
    assert one_line(ValueError("--seq-len must be a positive integer, got 0")) == "--seq-len must be a positive integer, got 0"
