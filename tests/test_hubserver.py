"""The test Hub (tests/hubserver.py) driven by the real huggingface_hub client, no mocks.

Also pins down the client behaviours the job relies on: which calls retry on 5xx, what a dead Hub raises, how the
client is pointed at a server in-process and in a subprocess. A few seconds: each client retry sleeps 1 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HfUriError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubserver import (
    OTHER_TOKEN,
    READ_TOKEN,
    WRITE_TOKEN,
    HubServer,
    client_env,
    isolate_client,
    point_client,
    start_hub,
)

THRESHOLD = 64 * 1024  # files this big go to LFS (and *.safetensors at any size)

MODEL_FILES = {
    "model_index.json": b'{"_class_name": "AuraFlowPipeline"}',
    "README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n",
    "scheduler/scheduler_config.json": b'{"shift": 1.73}',
    "transformer/config.json": b'{"num_layers": 1}',
    "transformer/diffusion_pytorch_model.safetensors": os.urandom(200_000),
    "transformer/diffusion_pytorch_model.bin": b"pickle, never downloaded",
    "vae/config.json": b'{"latent_channels": 4}',
}
ALLOW = ["model_index.json", "scheduler/*.json", "transformer/*.json", "transformer/*.safetensors"]


@pytest.fixture
def hub():
    server = start_hub(lfs_threshold=THRESHOLD)
    yield server
    server.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The client isolated in tmp_path (caches, token file, no HF_TOKEN, online, Xet off); its hub cache dir."""
    isolate_client(monkeypatch, tmp_path / "hf_home")
    return tmp_path / "hf_home" / "hub"


def api(hub: HubServer, token=WRITE_TOKEN) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# ------------------------------------------------------------------ downloads


def test_snapshot_download_gets_exact_bytes_then_serves_from_cache(hub, cache):
    sha = hub.add_repo("tester/tiny", MODEL_FILES)
    path = snapshot_download("tester/tiny", endpoint=hub.url, cache_dir=cache, allow_patterns=ALLOW, token=False)

    wanted = {p: d for p, d in MODEL_FILES.items() if p.split("/")[0] in ("model_index.json", "scheduler")
              or p.startswith("transformer/") and not p.endswith(".bin")}
    assert tree(path) == wanted
    assert Path(path).name == sha
    big = MODEL_FILES["transformer/diffusion_pytorch_model.safetensors"]
    entry = next(f for f in api(hub).list_repo_tree("tester/tiny", recursive=True)
                 if f.path == "transformer/diffusion_pytorch_model.safetensors")
    assert entry.lfs is not None and entry.lfs.size == len(big) and entry.xet_hash is None
    assert (cache / "models--tester--tiny" / "blobs" / entry.lfs.sha256).read_bytes() == big  # blob named by sha256
    assert len(hub.requests("GET", "/resolve/")) == len(wanted)

    hub.clear_log()
    again = snapshot_download("tester/tiny", endpoint=hub.url, cache_dir=cache, allow_patterns=ALLOW, token=False)
    assert again == path
    assert hub.requests("GET", "/resolve/") == [] and hub.requests("HEAD") == []
    assert [h.path for h in hub.log] == ["/api/models/tester/tiny/revision/main"]  # only the branch → sha lookup


def test_dataset_repo_downloads_with_repo_type(hub, cache):
    files = {"metadata.jsonl": b'{"file_name": "a.png", "text": "a cat"}\n', "a.png": os.urandom(3000)}
    hub.add_repo("tester/toy-set", files, repo_type="dataset")
    path = snapshot_download("tester/toy-set", repo_type="dataset", endpoint=hub.url, cache_dir=cache, token=False)
    assert tree(path) == files
    assert hub.requests("GET", "/datasets/tester/toy-set/resolve/")
    with pytest.raises(RepositoryNotFoundError):  # the same id as a model does not exist
        snapshot_download("tester/toy-set", endpoint=hub.url, cache_dir=cache, token=False)


def test_resolve_headers_and_ranges(hub):
    big = os.urandom(100_000)
    sha = hub.add_repo("tester/r", {"w.safetensors": big, "c.json": b"0123456789"})
    blob = hub.repo("tester/r").resolve("main").files["w.safetensors"]

    head = urllib.request.urlopen(urllib.request.Request(f"{hub.url}/tester/r/resolve/main/w.safetensors",
                                                         method="HEAD"))
    assert head.headers["X-Repo-Commit"] == sha and head.headers["Content-Length"] == str(len(big))
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{blob.sha256}"'
    assert head.headers["X-Linked-Size"] == str(len(big))
    small = urllib.request.urlopen(f"{hub.url}/tester/r/resolve/{sha}/c.json")
    assert small.headers["ETag"] == f'"{hub.repo("tester/r").resolve("main").files["c.json"].oid}"'  # git sha1

    def get(rng):
        req = urllib.request.Request(f"{hub.url}/tester/r/resolve/main/c.json", headers={"Range": rng})
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers["Content-Range"], r.read()

    assert get("bytes=2-4") == (206, "bytes 2-4/10", b"234")
    assert get("bytes=7-") == (206, "bytes 7-9/10", b"789")
    assert get("bytes=-2") == (206, "bytes 8-9/10", b"89")
    with pytest.raises(urllib.error.HTTPError) as e:
        get("bytes=10-")
    assert e.value.code == 416


# ------------------------------------------------------------------ auth and errors


def test_whoami_with_good_and_bad_token(hub, cache):
    me = api(hub).whoami()
    assert me["name"] == "tester" and me["auth"]["accessToken"]["role"] == "write"
    assert api(hub, READ_TOKEN).whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as e:
        api(hub, "hf_wrong").whoami()
    assert e.value.response.status_code == 401 and "Invalid user token" in str(e.value)
    hub.add_repo("tester/tiny", MODEL_FILES)
    with pytest.raises(HfHubHTTPError) as e:  # not RepositoryNotFoundError: a bad token is its own 401
        snapshot_download("tester/tiny", endpoint=hub.url, cache_dir=cache, token="hf_wrong")
    assert e.value.response.status_code == 401 and not isinstance(e.value, RepositoryNotFoundError)


def test_missing_repo_revision_and_file(hub, cache):
    hub.add_repo("tester/tiny", MODEL_FILES)
    for token in (False, WRITE_TOKEN):  # 401 without a token, 404 with one: both carry X-Error-Code RepoNotFound
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download("tester/nope", endpoint=hub.url, cache_dir=cache, token=token)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("tester/nope", "config.json", endpoint=hub.url, cache_dir=cache, token=token)
    with pytest.raises(RepositoryNotFoundError):
        api(hub).model_info("tester/nope")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("tester/tiny", revision="v9", endpoint=hub.url, cache_dir=cache, token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("tester/tiny", "model_index.json", revision="v9", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("tester/tiny", "nope.json", endpoint=hub.url, cache_dir=cache, token=False)


def test_gated_and_private_repos(hub, cache):
    hub.add_repo("owner/gated", {"w.safetensors": b"weights"}, gated=True)
    assert api(hub, False).model_info("owner/gated").gated == "manual"  # metadata is public, files are not
    for token in (False, WRITE_TOKEN):  # 401 anonymous, 403 authenticated but not granted
        with pytest.raises(GatedRepoError):
            snapshot_download("owner/gated", endpoint=hub.url, cache_dir=cache, token=token)
    hub.grant("owner/gated", "tester")
    path = snapshot_download("owner/gated", endpoint=hub.url, cache_dir=cache, token=WRITE_TOKEN)
    assert tree(path) == {"w.safetensors": b"weights"}

    hub.add_repo("mallory/secret", {"a.txt": b"s"}, private=True)
    for token in (False, WRITE_TOKEN):
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download("mallory/secret", endpoint=hub.url, cache_dir=cache, token=token)
    path = snapshot_download("mallory/secret", endpoint=hub.url, cache_dir=cache, token=OTHER_TOKEN)
    assert tree(path) == {"a.txt": b"s"}


def test_create_repo(hub, cache, monkeypatch):
    url = api(hub).create_repo("tester/new")
    assert url.repo_id == "tester/new" and url.endpoint == hub.url
    assert list(hub.files("tester/new")) == [".gitattributes"]  # like the Hub: an initial commit
    assert api(hub).create_repo("tester/new", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as e:
        api(hub).create_repo("tester/new")
    assert e.value.response.status_code == 409
    # A read-only token gets 403, and exist_ok falls back to repo_info; but that branch builds its RepoUrl without
    # endpoint=, so it only parses when constants.ENDPOINT (HF_ENDPOINT) is the server: a client bug in 2.4.0.
    with pytest.raises(HfUriError):
        api(hub, READ_TOKEN).create_repo("tester/new", exist_ok=True)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    assert api(hub, READ_TOKEN).create_repo("tester/new", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as e:
        api(hub, READ_TOKEN).create_repo("tester/ro", exist_ok=True)
    assert e.value.response.status_code == 403 and ("model", "tester/ro") not in hub.repos
    with pytest.raises(HfHubHTTPError) as e:
        api(hub).create_repo("mallory/theirs", exist_ok=True)  # someone else's namespace
    assert e.value.response.status_code == 403

    ds = api(hub).create_repo("tester/out-set", repo_type="dataset", private=True)
    assert ds.repo_type == "dataset" and "/datasets/tester/out-set" in ds
    assert hub.repo("tester/out-set", "dataset").private
    api(hub).upload_file(path_or_fileobj=b"p" * THRESHOLD, path_in_repo="data/train.parquet",
                         repo_id="tester/out-set", repo_type="dataset")
    assert hub.files("tester/out-set", "dataset")["data/train.parquet"] == b"p" * THRESHOLD
    assert hub.requests("POST", "/datasets/tester/out-set.git/info/lfs/objects/batch")
    assert hub.errors == []


# ------------------------------------------------------------------ uploads


def test_upload_folder_regular_and_lfs_paths(hub, cache, tmp_path):
    files = {
        "README.md": b"---\ntags: [lycoris, auraflow]\n---\n# adapter\n",  # goes through /api/validate-yaml
        "lycoris_config.json": b'{"algo": "lokr"}',
        "samples/notes.txt": b"step 10",
        "empty.txt": b"",
        "adapter.safetensors": os.urandom(2000),  # LFS by pattern
        "checkpoints/state.dat": os.urandom(THRESHOLD + 1),  # LFS by size
    }
    folder = write_tree(tmp_path / "out", files)
    client = api(hub)
    client.create_repo("tester/lokr")
    info = client.upload_folder(repo_id="tester/lokr", folder_path=folder, commit_message="push adapter")

    assert hub.files("tester/lokr") == {**files, ".gitattributes": hub.files("tester/lokr")[".gitattributes"]}
    assert info.oid == hub.commits("tester/lokr")[0].oid and hub.commits("tester/lokr")[0].message == "push adapter"
    assert {p for p, b in hub.repo("tester/lokr").resolve("main").files.items() if b.lfs} == {
        "adapter.safetensors", "checkpoints/state.dat"}
    assert len(hub.requests("PUT", "/_lfs/upload/")) == 2
    assert len(hub.requests("POST", "/info/lfs/objects/batch")) == 1
    assert len(hub.requests("POST", "/commit/main")) == 1
    assert hub.requests("POST", "/api/validate-yaml") and not hub.requests(contains="xet")
    for rel, data in files.items():  # and back through the client
        assert Path(hf_hub_download("tester/lokr", rel, endpoint=hub.url, cache_dir=cache, token=False)).read_bytes() == data

    hub.clear_log()  # unchanged files are recognised from the preupload oids: no new commit, nothing sent
    client.upload_folder(repo_id="tester/lokr", folder_path=folder)
    assert len(hub.commits("tester/lokr")) == 2 and not hub.requests("PUT") and not hub.requests(contains="/commit/")

    client.upload_file(path_or_fileobj=os.urandom(THRESHOLD * 2), path_in_repo="big.bin", repo_id="tester/lokr")
    client.delete_file("samples/notes.txt", repo_id="tester/lokr")
    client.delete_folder("checkpoints", repo_id="tester/lokr")
    assert sorted(hub.files("tester/lokr")) == [".gitattributes", "README.md", "adapter.safetensors", "big.bin",
                                                 "empty.txt", "lycoris_config.json"]
    with pytest.raises(HfHubHTTPError) as e:
        api(hub, READ_TOKEN).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="tester/lokr")
    assert e.value.response.status_code == 403
    stale = hub.commits("tester/lokr")[1].oid
    with pytest.raises(HfHubHTTPError) as e:  # parent_commit no longer the head
        client.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="tester/lokr", parent_commit=stale)
    assert e.value.response.status_code == 412
    assert client.file_exists("tester/lokr", "big.bin") and not client.file_exists("tester/lokr", "x.txt")
    assert [(f.path, f.lfs is not None) for f in client.get_paths_info("tester/lokr", ["big.bin", "empty.txt"])] == [
        ("big.bin", True), ("empty.txt", False)]
    assert hub.errors == []


def test_uploads_with_xet_left_on(hub, cache, tmp_path, monkeypatch):
    """With hf_xet installed the client, not the server, sends every "lfs" file through Xet."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    client = api(hub)
    client.create_repo("tester/x")
    client.upload_file(path_or_fileobj=b"small", path_in_repo="a.txt", repo_id="tester/x")  # regular: no Xet
    with pytest.raises(Exception):  # noqa: B017 - hf_xet raises a builtin ConnectionError on the 501
        client.upload_file(path_or_fileobj=b"w", path_in_repo="w.safetensors", repo_id="tester/x")
    assert [h.status for h in hub.requests("GET", "/xet-write-token/")] == [501]
    assert hub.files("tester/x").keys() == {".gitattributes", "a.txt"}

    regular_only = start_hub(lfs_threshold=None, lfs_patterns=())  # the one server-side way around Xet
    try:
        folder = write_tree(tmp_path / "f", {"w.safetensors": os.urandom(THRESHOLD * 2), "c.json": b"{}"})
        api(regular_only).create_repo("tester/x")
        api(regular_only).upload_folder(repo_id="tester/x", folder_path=folder)
        assert regular_only.files("tester/x")["w.safetensors"] == (folder / "w.safetensors").read_bytes()
        assert not regular_only.requests(contains="xet") and not regular_only.requests(contains="/info/lfs/")
    finally:
        regular_only.stop()


# ------------------------------------------------------------------ faults and retries


def test_upload_retries_5xx_except_on_the_commit_itself(hub, cache):
    client = api(hub)
    client.create_repo("tester/out")
    hub.fail_next(1, 500)  # hits the preupload call, which goes through http_backoff
    client.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id="tester/out")
    assert [h.status for h in hub.requests("POST", "/preupload/")] == [500, 200]
    assert hub.files("tester/out")["a.txt"] == b"one"

    hub.fail_next(1, 503, match="PUT /_lfs/upload/")  # LFS PUT: retried too
    client.upload_file(path_or_fileobj=os.urandom(THRESHOLD), path_in_repo="w.bin", repo_id="tester/out")
    assert [h.status for h in hub.requests("PUT")] == [503, 200]

    hub.fail_next(1, 500, match="/commit/")  # create_commit's own POST is not retried
    with pytest.raises(HfHubHTTPError) as e:
        client.upload_file(path_or_fileobj=b"two", path_in_repo="a.txt", repo_id="tester/out")
    assert e.value.response.status_code == 500 and hub.files("tester/out")["a.txt"] == b"one"

    hub.drop_next(1, match="/commit/")  # a lost response: the commit happened, the client raises anyway
    with pytest.raises(httpx2.RemoteProtocolError):
        client.upload_file(path_or_fileobj=b"three", path_in_repo="a.txt", repo_id="tester/out")
    assert hub.files("tester/out")["a.txt"] == b"three"


def test_download_retries(hub, cache):
    big = os.urandom(300_000)
    hub.add_repo("tester/m", {"w.safetensors": big, "c.json": b"{}"})
    hub.fail_next(1, 500, match="HEAD ")  # metadata: a failed HEAD with nothing cached is retried
    assert Path(hf_hub_download("tester/m", "c.json", endpoint=hub.url, cache_dir=cache)).read_bytes() == b"{}"

    hub.fail_next(1, 500, match="GET /tester/m/resolve/")  # the body GET: 5xx is NOT retried
    with pytest.raises(HfHubHTTPError) as e:
        hf_hub_download("tester/m", "w.safetensors", endpoint=hub.url, cache_dir=cache)
    assert e.value.response.status_code == 500

    hub.clear_log()
    hub.drop_next(1, match="GET /tester/m/resolve/")  # a broken body: the download starts again
    assert Path(hf_hub_download("tester/m", "w.safetensors", endpoint=hub.url, cache_dir=cache)).read_bytes() == big
    assert len(hub.requests("GET", "/resolve/")) == 2

    hub.fail_next(1, 500, match="/tree/")  # snapshot: the tree listing is retried...
    assert tree(snapshot_download("tester/m", endpoint=hub.url, cache_dir=cache / "a")) == {
        "w.safetensors": big, "c.json": b"{}"}
    hub.fail_next(1, 500, match="/revision/")  # ...the repo_info before it is not
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("tester/m", endpoint=hub.url, cache_dir=cache / "b")


def test_stalled_body_resumes_with_range_after_release(hub, cache):
    big = os.urandom(10 * 2**20 + 2**19)  # the client writes 10 MiB chunks: only those survive a broken stream
    hub.add_repo("tester/big", {"w.safetensors": big})
    hub.stall_after(10 * 2**20 + 2**18)
    result = {}
    worker = threading.Thread(target=lambda: result.update(path=hf_hub_download(
        "tester/big", "w.safetensors", endpoint=hub.url, cache_dir=cache)), daemon=True)
    worker.start()
    assert hub.stalled.wait(10)
    hub.release()  # the stalled response is cut; the client resumes from the last chunk it wrote
    worker.join(20)
    assert Path(result["path"]).read_bytes() == big
    assert [h.headers.get("range") for h in hub.requests("GET", "/resolve/")] == [None, f"bytes={10 * 2**20}-"]


def test_down_then_up(hub, cache):
    hub.add_repo("tester/m", {"c.json": b"{}"})
    cached = snapshot_download("tester/m", endpoint=hub.url, cache_dir=cache)
    hub.down()
    with pytest.raises(httpx2.ConnectError):
        api(hub).model_info("tester/m")
    with pytest.raises(httpx2.ConnectError):
        api(hub).whoami()
    with pytest.raises(LocalEntryNotFoundError):  # nothing cached for this cache dir
        snapshot_download("tester/m", endpoint=hub.url, cache_dir=cache / "other")
    assert snapshot_download("tester/m", endpoint=hub.url, cache_dir=cache) == cached  # cached: served offline
    hub.up()
    assert api(hub).model_info("tester/m").sha == hub.commits("tester/m")[0].oid


# ------------------------------------------------------------------ pointing the client at the server


def test_point_client_for_code_without_endpoint_args(hub, tmp_path, monkeypatch):
    import huggingface_hub

    point_client(hub, monkeypatch, tmp_path / "home")
    hub.add_repo("tester/m", {"c.json": b"{}"})
    path = huggingface_hub.snapshot_download("tester/m", token=False)  # as job.hub calls it
    assert Path(path).is_relative_to(tmp_path / "home" / "hub") and tree(path) == {"c.json": b"{}"}
    assert huggingface_hub.whoami(token=WRITE_TOKEN)["name"] == "tester"  # module-level HfApi
    huggingface_hub.create_repo("tester/out", token=WRITE_TOKEN)
    huggingface_hub.upload_file(path_or_fileobj=b"w", path_in_repo="w.safetensors", repo_id="tester/out",
                                token=WRITE_TOKEN)
    assert hub.files("tester/out")["w.safetensors"] == b"w"


def test_subprocess_with_client_env(hub, tmp_path):
    hub.add_repo("tester/m", {"sub/c.json": b"{}", "w.safetensors": b"w" * 100})
    hub.add_repo("tester/out", {})
    script = (
        "import json, huggingface_hub as h\n"
        "p = h.snapshot_download('tester/m')\n"
        "h.upload_file(path_or_fileobj=b'x' * 100, path_in_repo='lokr.safetensors', repo_id='tester/out')\n"
        "print(json.dumps({'path': p, 'me': h.whoami()['name']}))\n"
    )
    env = {**os.environ, **client_env(hub, tmp_path / "home"), "HF_TOKEN": WRITE_TOKEN}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["me"] == "tester" and Path(result["path"]).is_relative_to(tmp_path / "home" / "hub")
    assert tree(result["path"]) == {"sub/c.json": b"{}", "w.safetensors": b"w" * 100}
    assert hub.files("tester/out") == {"lokr.safetensors": b"x" * 100}
    assert hub.requests("PUT", "/_lfs/upload/")  # HF_HUB_DISABLE_XET=1 took the LFS path
