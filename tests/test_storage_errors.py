"""check_writable and error messages: fast, one line, naming the URL, never carrying a secret."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest

from pretrain.storage import StorageError, StorageOptions, open_storage, redact
from tests import emulators
from tests.storage_fixtures import CLOUD_PROVIDERS

FAKE_SECRET = "FAKESECRET" + uuid.uuid4().hex.upper()
FAKE_AZURE_KEY = base64.b64encode(FAKE_SECRET.encode()).decode()
FAST_FAILURE_SECONDS = 10.0
SCHEME = {"s3": "s3", "gcs": "gs", "azure": "az"}


def assert_clean_one_line(message: str, url: str) -> None:
    assert url in message
    assert "\n" not in message
    for secret in (FAKE_SECRET, FAKE_AZURE_KEY, emulators.AZURITE_KEY):
        assert secret not in message


def unreachable_env(provider: str) -> dict[str, str]:
    endpoint = f"http://127.0.0.1:{emulators.closed_port()}"
    if provider == "s3":
        return {**emulators.s3_env(endpoint), "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    if provider == "gcs":
        return emulators.gcs_env(endpoint)
    return {"AZURE_STORAGE_CONNECTION_STRING": emulators.azurite_connection_string(endpoint, key=FAKE_AZURE_KEY)}


def test_check_writable_passes_and_leaves_nothing_behind(bucket):
    storage = open_storage(bucket.url)

    storage.check_writable()

    assert storage.list() == []


@pytest.mark.parametrize("provider", CLOUD_PROVIDERS)
def test_check_writable_on_missing_bucket_fails_fast(provider, new_bucket, activate):
    activate(new_bucket(provider))
    url = f"{SCHEME[provider]}://missing-{uuid.uuid4().hex[:10]}/run"

    started = time.monotonic()
    with pytest.raises(StorageError, match="does not exist") as raised:
        open_storage(url).check_writable()

    assert time.monotonic() - started < FAST_FAILURE_SECONDS
    assert_clean_one_line(str(raised.value), url)
    assert "not writable" in str(raised.value)


@pytest.mark.parametrize("provider", CLOUD_PROVIDERS)
def test_check_writable_on_unreachable_endpoint_fails_fast(provider, isolated_env):
    for name, value in unreachable_env(provider).items():
        isolated_env.setenv(name, value)
    url = f"{SCHEME[provider]}://some-bucket/run"

    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach") as raised:
        open_storage(url).check_writable()  # default options: the write check shortens retries itself

    assert time.monotonic() - started < FAST_FAILURE_SECONDS
    assert_clean_one_line(str(raised.value), url)


def test_azure_wrong_account_key_is_access_denied(new_bucket, activate, isolated_env, azurite_emulator):
    bucket = activate(new_bucket("azure"))
    isolated_env.setenv("AZURE_STORAGE_CONNECTION_STRING",
                        emulators.azurite_connection_string(azurite_emulator.endpoint, key=FAKE_AZURE_KEY))

    with pytest.raises(StorageError, match="access denied") as raised:
        open_storage(bucket.url).check_writable()

    assert_clean_one_line(str(raised.value), bucket.url)


def test_local_write_check_names_the_path(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    url = (tmp_path / "a-file" / "root").as_uri()

    with pytest.raises(StorageError) as raised:
        open_storage(url).check_writable()

    assert_clean_one_line(str(raised.value), url)


def test_gcs_credentials_file_contents_stay_out_of_errors(tmp_path, isolated_env):
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": FAKE_SECRET,
        "private_key": f"-----BEGIN PRIVATE KEY-----\n{FAKE_SECRET}\n-----END PRIVATE KEY-----\n",
        "client_email": "someone@p.iam.gserviceaccount.com", "token_uri": "http://127.0.0.1:1/token"}))
    storage = open_storage("gs://bucket/run", StorageOptions(gcs_credentials=str(key_file)))

    with pytest.raises(StorageError) as raised:
        storage.exists("x")

    assert_clean_one_line(str(raised.value), "gs://bucket/run/x")


def test_missing_cloud_credentials_say_so(isolated_env, tmp_path):
    isolated_env.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # hides any gcloud application-default login
    isolated_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{emulators.closed_port()}")

    with pytest.raises(StorageError, match="no credentials found"):
        open_storage("s3://bucket/run").exists("x")
    with pytest.raises(StorageError, match="no credentials found"):
        open_storage("gs://bucket/run").exists("x")
    with pytest.raises(StorageError, match="AZURE_STORAGE_CONNECTION_STRING.*AZURE_STORAGE_ACCOUNT"):
        open_storage("az://container/run").exists("x")


def test_missing_sdk_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_boto3(name, *args, **kwargs):
        if name == "boto3" or name.startswith("boto3."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "pretrain.storage.s3", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_boto3)
    with pytest.raises(StorageError, match=r"s3://b/p.*pip install boto3"):
        open_storage("s3://b/p")


@pytest.mark.parametrize("text, secret", [
    ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0a2V5;EndpointSuffix=core.windows.net",
     "c2VjcmV0a2V5"),
    ("failed with AccountKey=c2VjcmV0a2V5 set", "c2VjcmV0a2V5"),
    ("GET https://acct.blob.core.windows.net/c/b?sv=2022-11-02&se=2030&sp=r&sig=AbC%2Bdef%3D HTTP/1.1", "AbC%2Bdef"),
    ("SharedAccessSignature=sv=2022&sig=zzz9", "zzz9"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAEXAMPLE%2F20250101&X-Amz-Signature=0123abcd", "0123abcd"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAEXAMPLE%2F20250101&X-Amz-Signature=0123abcd", "AKIAEXAMPLE"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=feedface&X-Goog-Credential=sa%40p", "feedface"),
    ("{'Authorization': 'Bearer ya29.tokenvalue', 'User-Agent': 'x'}", "ya29.tokenvalue"),
    ("Authorization: SharedKey acct:c2lnbmF0dXJl", "c2lnbmF0dXJl"),
    ('"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBg\\n-----END PRIVATE KEY-----\\n"', "MIIEvQIBADANBg"),
    ("aws_secret_access_key = wJalrXUtnFEMI", "wJalrXUtnFEMI"),
    ("https://user:hunter2@proxy.example/path", "hunter2"),
])
def test_redact_removes_secrets(text, secret):
    cleaned = redact(text)
    assert secret not in cleaned
    assert "<redacted>" in cleaned


def test_redact_keeps_ordinary_text():
    text = "upload to s3://bucket/run/model.safetensors failed: the bucket does not exist (NoSuchBucket)"
    assert redact(text) == text
