"""Upload while building (`build --push-to-hub --delete-local-after-upload`) against the loopback Hub."""

from __future__ import annotations

import threading

import pytest
from helpers import assert_same_content, decoded_rows, small_config
from hub_server import hub_fixtures

import builder.push as push_module
from builder.build_state import read_sidecar
from builder.pipeline import build
from builder.push import PushTarget, push_cache
from builder.reader import load_cache

hub_server, hub = hub_fixtures()


def test_upload_while_building_keeps_few_shards_and_equals_push_after_build(hub, tmp_path, monkeypatch):
    local = build(small_config(tmp_path / "local", shard_size=2), progress=False).output_dir  # 7 shards
    push_cache(local, PushTarget("tester/after-build", tag="v1"))

    counts = []
    real_upload = push_module.ShardUploader.upload

    def counting_upload(self, path, sha256=None):
        counts.append(len(list(path.parent.glob("*.parquet"))))  # at every shard handed over
        return real_upload(self, path, sha256)

    monkeypatch.setattr(push_module.ShardUploader, "upload", counting_upload)
    # the build hands the push the manifest it assembled: the card is not read back
    monkeypatch.setattr(push_module, "read_manifest", lambda *a, **k: pytest.fail("the push re-read the card"))
    out = tmp_path / "streamed"
    cfg = small_config(out, shard_size=2, push_to_hub="tester/while-building", hub_tag="v1", delete_local_after_upload=True)
    result = build(cfg, progress=False)
    assert len(counts) == 7 and max(counts) <= 3  # queued + uploading + just written
    assert not list((out / "data").glob("*.parquet"))  # every shard went to the Hub and was removed
    assert hub.repo("tester/while-building").tags["v1"] == result.pushed.commit
    remote = list(load_cache("tester/while-building", revision="v1", layout="raw"))
    assert_same_content(remote, list(load_cache("tester/after-build", revision="v1", layout="raw")))
    assert_same_content(remote, decoded_rows(local))


def test_resume_knows_which_shards_are_on_the_hub(hub, tmp_path, monkeypatch, caplog):
    out = tmp_path / "cache"
    cfg = small_config(out, shard_size=2, push_to_hub="tester/resumed", hub_tag="v1", delete_local_after_upload=True)
    import builder.forward as forward_module

    real, done = forward_module.write_one_shard, []
    real_upload_shards, uploaded, three_uploaded = push_module.HubPusher.upload_shards, [], threading.Event()

    def upload_shards(self, shards):
        shas = real_upload_shards(self, shards)
        uploaded.extend(shas)
        if len(uploaded) == 3:
            three_uploaded.set()
        return shas

    def stop_after_three(*args, **kwargs):
        if len(done) == 3:
            assert three_uploaded.wait(60)  # an interrupt stops the uploads at once: let the three land first
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(push_module.HubPusher, "upload_shards", upload_shards)
    monkeypatch.setattr(forward_module, "write_one_shard", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        build(cfg, progress=False)
    assert "v1" not in hub.repo("tester/resumed").tags  # no tag on an incomplete version
    monkeypatch.setattr(forward_module, "write_one_shard", real)
    result = build(cfg.replace(resume=True), progress=False)
    assert len(result.written) == 4  # the three shards already on the Hub were not rebuilt
    # their samples are not compared with this run's: that would download them
    assert "3 shard(s) this build uploaded and deleted here (--delete-local-after-upload) are not checked" in caplog.text
    reference = build(small_config(tmp_path / "reference", shard_size=2), progress=False).output_dir
    assert_same_content(list(load_cache("tester/resumed", revision="v1", layout="raw")), decoded_rows(reference))


def test_verify_a_pushed_repo(hub, tmp_path, capsys):
    from builder.cli import main

    local = build(small_config(tmp_path / "local", max_samples=6), progress=False).output_dir
    push_cache(local, PushTarget("tester/verified", tag="v1"))
    assert main(["verify", "tester/verified", "--revision", "v1", "--recompute", "2"]) == 0
    assert "tester/verified: OK (the recomputed samples match)" in capsys.readouterr().out


def test_rebuilding_what_the_tag_already_holds_reports_it_and_succeeds(hub, tmp_path, capsys):
    from builder.cli import main

    args = ["build", "--output-dir", str(tmp_path / "cache"), "--max-samples", "6", "--seq-length", "96", "--shard-size", "4"]
    args += ["--draft-vocab-size", "300", "--dtype", "fp32", "--push-to-hub", "tester/again", "--hub-tag", "v1", "--quiet"]
    assert main(args) == 0
    tagged = hub.repo("tester/again").tags["v1"]
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "tester/again@v1 already holds this build; read it: builder.load_cache('tester/again', revision='v1'" in out
    assert hub.repo("tester/again").tags["v1"] == tagged


def test_rebuilding_what_the_tag_holds_as_an_earlier_version_recorded_it_reports_it(hub, tmp_path):
    """A build an earlier version recorded with its tokenizer's hash as loaded (accepted on resume) keeps
    that identity when resumed, so the tag it was pushed under still names it."""
    import json

    from helpers import record_in_card
    from tiny_targets import target_with_truncation_and_padding, tokenizer_hash_of_earlier_versions

    from builder.build_state import BUILD_STATE_FILE

    target = target_with_truncation_and_padding(tmp_path / "target")
    cfg = small_config(tmp_path / "cache", target=target, max_samples=6)
    cache = build(cfg, progress=False).output_dir
    earlier = tokenizer_hash_of_earlier_versions(target)
    state = cache / BUILD_STATE_FILE
    state.write_text(json.dumps(json.loads(state.read_text()) | {"tokenizer_sha256": earlier}))
    record_in_card(cache, tokenizer_sha256=earlier)  # as the earlier version left it, and pushed it
    push_cache(cache, PushTarget("tester/earlier", tag="v1"))
    tagged = hub.repo("tester/earlier").tags["v1"]
    again = build(cfg.replace(resume=True, push_to_hub="tester/earlier", hub_tag="v1"), progress=False)
    assert again.pushed is not None and hub.repo("tester/earlier").tags["v1"] == tagged


def test_rebuilding_what_the_tag_holds_from_before_an_identity_field_existed_reports_it(hub, tmp_path):
    """A build recorded before the target's code fields existed resumes without them, so an upgrade leaves
    its fingerprint, and the tag it was pushed under, naming it."""
    import json

    from helpers import record_in_card

    from builder.build_state import BUILD_STATE_FILE

    cfg = small_config(tmp_path / "cache", max_samples=6)
    cache = build(cfg, progress=False).output_dir
    state = cache / BUILD_STATE_FILE
    identity = json.loads(state.read_text())
    target = {key: value for key, value in identity["target"].items() if key not in ("remote_code", "code_sha256")}
    assert target != identity["target"]
    state.write_text(json.dumps(identity | {"target": target}))
    record_in_card(cache, target=target)  # as the earlier version left it, and pushed it
    push_cache(cache, PushTarget("tester/older", tag="v1"))
    tagged = hub.repo("tester/older").tags["v1"]
    again = build(cfg.replace(resume=True, push_to_hub="tester/older", hub_tag="v1"), progress=False)
    assert again.pushed is not None and hub.repo("tester/older").tags["v1"] == tagged


def test_the_summary_of_a_build_that_deleted_its_shards_points_at_the_hub_only(hub, tmp_path, capsys):
    from builder.cli import main

    out = tmp_path / "cache"
    args = ["build", "--output-dir", str(out), "--max-samples", "6", "--seq-length", "96", "--shard-size", "4"]
    args += ["--draft-vocab-size", "300", "--dtype", "fp32", "--push-to-hub", "tester/deleted-here", "--hub-tag", "v1", "--quiet"]
    assert main([*args, "--delete-local-after-upload"]) == 0
    summary = capsys.readouterr().out
    assert not list((out / "data").glob("*.parquet"))
    assert f"load_cache({str(out)!r}" not in summary  # a folder with no shards to read
    assert "read it: not from here: the shards were uploaded and deleted here (--delete-local-after-upload)" in summary
    assert "pushed: builder.load_cache('tester/deleted-here', revision='v1'" in summary


def test_a_build_uploading_as_it_goes_rides_out_a_hub_outage(hub, tmp_path, monkeypatch):
    import dataclasses

    import builder.pipeline as pipeline_module
    from builder.hub import Retry

    policy = pipeline_module.UPLOAD_WHILE_BUILDING_RETRY
    assert policy.total_wait() >= 20 * 60 > Retry().total_wait()  # minutes of outage, where a push gives up in seconds
    monkeypatch.setattr(pipeline_module, "UPLOAD_WHILE_BUILDING_RETRY", dataclasses.replace(policy, backoff=0.001, max_wait=0.001))
    outage = hub.add_fault("POST", r"/commit/", status=503, times=Retry().retries + 2)  # longer than a push rides out
    cfg = small_config(tmp_path / "cache", shard_size=4, push_to_hub="tester/outage", hub_tag="v1", delete_local_after_upload=True)
    result = build(cfg, progress=False)
    assert outage.fired == Retry().retries + 2
    assert hub.repo("tester/outage").tags["v1"] == result.pushed.commit
    assert_same_content(
        list(load_cache("tester/outage", revision="v1", layout="raw")),
        decoded_rows(build(small_config(tmp_path / "local", shard_size=4), progress=False).output_dir),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`small_config`'s cache, built locally: what each Hub dataset below must hold."""
    return build(small_config(tmp_path_factory.mktemp("reference") / "cache"), progress=False).output_dir


@pytest.fixture
def quick_upload_retries(monkeypatch):
    """The build's uploads retried as often as ever, without the waits between."""
    import dataclasses

    import builder.pipeline as pipeline_module

    policy = dataclasses.replace(pipeline_module.UPLOAD_WHILE_BUILDING_RETRY, backoff=0.001, max_wait=0.001)
    monkeypatch.setattr(pipeline_module, "UPLOAD_WHILE_BUILDING_RETRY", policy)
    return policy


@pytest.mark.parametrize("status", [409, 412])
def test_a_build_whose_shard_commits_race_another_ranks_commits_completes(hub, tmp_path, reference, quick_upload_retries, status):
    # Every rank commits its shards to one branch: the Hub answers one that races another 409 or 412.
    raced = hub.conflict_next_commits(3, status=status, skip=1)  # the second shard's commit, three times
    repo = f"tester/raced-build-{status}"
    cfg = small_config(tmp_path / "cache", push_to_hub=repo, hub_tag="v1", delete_local_after_upload=True)
    result = build(cfg, progress=False)
    assert raced.fired == 3
    assert hub.repo(repo).tags["v1"] == result.pushed.commit
    assert_same_content(list(load_cache(repo, revision="v1", layout="raw")), decoded_rows(reference))


def test_a_read_only_token_is_refused_before_the_target_loads(hub, tmp_path, monkeypatch):
    from hub_server import READ_TOKEN, TOKEN
    from huggingface_hub import HfApi

    import builder.forward as forward_module
    from builder.hub import HubError

    HfApi(endpoint=hub.url, token=TOKEN).create_repo("tester/read-only", repo_type="dataset")  # the team's repo
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    monkeypatch.setattr(forward_module, "load_placed_model", lambda *a: pytest.fail("the target loaded"))
    cfg = small_config(tmp_path / "cache", push_to_hub="tester/read-only", hub_tag="v1")
    with pytest.raises(HubError, match=r"pushing to tester/read-only: the token is read-only; expected one with write access"):
        build(cfg, progress=False)
    assert not (tmp_path / "cache" / "data").exists()
    assert hub.requests("POST") == [("POST", "/api/repos/create", 200)]  # the team's own: the build sent nothing


def test_a_build_never_uploads_over_another_datasets_shard_named_file(hub, tmp_path, monkeypatch):
    from hub_server import TOKEN
    from huggingface_hub import CommitOperationAdd, HfApi

    import builder.forward as forward_module
    from builder.hub import HubError

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("tester/their-rows", repo_type="dataset")  # no card: their data only, one file of a name the build writes
    theirs = CommitOperationAdd("data/train-00002-of-00004.parquet", b"their rows")
    before = api.create_commit("tester/their-rows", [theirs], commit_message="their data", repo_type="dataset").oid
    hub.reset_counters()
    monkeypatch.setattr(forward_module, "load_placed_model", lambda *a: pytest.fail("the target loaded"))
    cfg = small_config(tmp_path / "cache", push_to_hub="tester/their-rows", hub_tag="v1")  # 4 shards
    with pytest.raises(HubError, match=r"no eagle3-cache card describes its root.* found 1 \(data/train-00002-of-00004\.parquet\)"):
        build(cfg, progress=False)
    assert hub.repo("tester/their-rows").branches["main"] == before and hub.state.bytes_uploaded == 0


def test_a_build_stopped_after_an_upload_landed_but_before_it_was_recorded_resumes(hub, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    cfg = small_config(out, shard_size=2, push_to_hub="tester/landed", hub_tag="v1")  # 7 shards, none deleted locally
    real_record = push_module.record_sha256

    def stop_at_the_first_record(*args, **kwargs):
        raise KeyboardInterrupt  # the commit holding the shard is on the branch; its sha256 is nowhere locally

    from builder.hub import HubError

    monkeypatch.setattr(push_module, "record_sha256", stop_at_the_first_record)
    with pytest.raises(HubError, match="uploading shards to tester/landed failed"):  # the uploader's thread stopped
        build(cfg, progress=False)
    landed = push_module.HubPusher(PushTarget("tester/landed")).open().remote_shards()
    assert landed and not any((read_sidecar(out, name) or {}).get("sha256") for name in landed)
    monkeypatch.setattr(push_module, "record_sha256", real_record)
    result = build(cfg.replace(resume=True), progress=False)  # the landed shard is this build's own: not another dataset's
    assert hub.repo("tester/landed").tags["v1"] == result.pushed.commit
    reference = build(small_config(tmp_path / "reference", shard_size=2), progress=False).output_dir
    assert_same_content(list(load_cache("tester/landed", revision="v1", layout="raw")), decoded_rows(reference))


def test_a_build_interrupted_during_a_hub_outage_stops_its_uploads_at_once_and_resumes(hub, tmp_path, reference, monkeypatch):
    import dataclasses
    import logging
    from types import SimpleNamespace

    import builder.forward as forward_module
    import builder.hub as hub_module
    import builder.pipeline as pipeline_module
    from builder.pipeline import shard_matches_record
    from builder.shards import shard_name

    # An outage: every commit fails, and each retry waits an hour. A wait the interrupt cannot end passes
    # at once here (the module's clock never sleeps), so the test sees the uploads go on instead of hanging.
    hourly = dataclasses.replace(pipeline_module.UPLOAD_WHILE_BUILDING_RETRY, backoff=3600.0, max_wait=3600.0)
    monkeypatch.setattr(pipeline_module, "UPLOAD_WHILE_BUILDING_RETRY", hourly)
    monkeypatch.setattr(hub_module, "time", SimpleNamespace(sleep=lambda seconds: None))
    hub.add_fault("POST", r"/commit/", status=503, times=None)
    retrying, third_handed_over, interrupted = threading.Event(), threading.Event(), threading.Event()

    class HeldAtTheFirstRetry(logging.Handler):  # on the uploader's thread: shard 0's commit failed, a retry wait follows
        def emit(self, record):
            if "retry 1/" in record.getMessage() and not retrying.is_set():
                retrying.set()
                interrupted.wait(60)  # until the build is interrupted: the commits sent before it are counted first

    real_upload, handed_over, uploaders = push_module.ShardUploader.upload, [], []

    def upload(self, path, sha256=None):  # on the writer's thread
        handed_over.append(path)
        uploaders.append(self)
        if len(handed_over) == 3:  # shard 0 uploading, shard 1 queued: the writer waits here for room in the queue
            third_handed_over.set()
        return real_upload(self, path, sha256)

    real_write, commits_before, watchdogs, stuck = forward_module.write_one_shard, [], [], []

    def ctrl_c_at_the_last_shard(prep, target, writer, path, shard, *args):
        if shard == 3 and not interrupted.is_set():
            assert retrying.wait(60) and third_handed_over.wait(60)
            commits_before.append(len(hub.requests("POST", r"/commit/")))
            # Only where the interrupt fails to stop the uploads: ends their hour-long wait, so that the
            # test fails instead of hanging.
            watchdogs.append(threading.Timer(120, lambda: (stuck.append(True), uploaders[0].cancel())))
            watchdogs[0].start()
            interrupted.set()
            raise KeyboardInterrupt
        return real_write(prep, target, writer, path, shard, *args)

    monkeypatch.setattr(push_module.ShardUploader, "upload", upload)
    monkeypatch.setattr(forward_module, "write_one_shard", ctrl_c_at_the_last_shard)
    out, repo = tmp_path / "cache", "tester/interrupted-outage"
    cfg = small_config(out, push_to_hub=repo, hub_tag="v1", delete_local_after_upload=True)  # 4 shards
    threads_before, held = set(threading.enumerate()), HeldAtTheFirstRetry()
    logging.getLogger("builder.hub").addHandler(held)
    try:
        with pytest.raises(KeyboardInterrupt):
            build(cfg, progress=False)
    finally:
        logging.getLogger("builder.hub").removeHandler(held)
        interrupted.set()
        for watchdog in watchdogs:
            watchdog.cancel()
    assert not stuck, "the interrupted build went on waiting for its uploads"
    assert hub.requests("POST", r"/commit/")[commits_before[0] :] == []  # not one more try once interrupted
    assert not [t for t in set(threading.enumerate()) - threads_before if t.name == "eagle3-shard-uploader"]
    kept = sorted(path.name for path in (out / "data").glob("*.parquet"))  # none was uploaded, so none was deleted
    assert kept == [shard_name(k, 4) for k in range(3)] and all(shard_matches_record(out, name) for name in kept)
    assert "v1" not in hub.repo(repo).tags

    hub.clear_faults()  # the Hub answers again
    result = build(cfg.replace(resume=True), progress=False)
    assert result.written == [shard_name(3, 4)]
    assert hub.repo(repo).tags["v1"] == result.pushed.commit
    assert_same_content(list(load_cache(repo, revision="v1", layout="raw")), decoded_rows(reference))


def test_a_build_whose_shard_uploads_the_hub_keeps_failing_says_to_resume_it(hub, tmp_path, reference, quick_upload_retries):
    from builder.errors import ConfigError
    from builder.hub import HubError

    out, repo = tmp_path / "cache", "tester/failing-shards"
    cfg = small_config(out, push_to_hub=repo, hub_tag="v1", delete_local_after_upload=True)
    hub.add_fault("POST", r"/commit/", status=503, times=None)
    advice = r"once it answers again, run the same build with --resume: the shards it finished are kept \(here, or on the Hub\)"
    with pytest.raises(HubError, match=rf"(?s)upload train-00000-of-00004\.parquet on {repo} failed: the Hub kept failing .*; {advice}"):
        build(cfg, progress=False)
    hub.clear_faults()
    with pytest.raises(ConfigError, match=r"It already holds an eagle3-cache build; pass --resume"):  # the same command
        build(cfg, progress=False)
    result = build(cfg.replace(resume=True), progress=False)
    assert hub.repo(repo).tags["v1"] == result.pushed.commit
    assert_same_content(list(load_cache(repo, revision="v1", layout="raw")), decoded_rows(reference))


@pytest.mark.parametrize("failing", ["card", "tag"])
def test_a_build_whose_card_or_tag_the_hub_keeps_failing_says_to_resume_it_or_push_it(
    hub, tmp_path, reference, quick_upload_retries, capsys, failing
):
    import re
    import shlex

    from builder.cli import main
    from builder.hub import HubError

    out, repo = tmp_path / "cache", f"tester/failing-{failing}"
    cfg = small_config(out, push_to_hub=repo, hub_tag="v1", delete_local_after_upload=True)  # 4 shards, one commit each
    if failing == "card":
        hub.add_fault("POST", r"/commit/", status=500, skip=4, times=None)
    else:
        hub.add_fault("POST", r"/tag/", status=502, times=None)
    push = f"eagle3-cache push {out} {repo} --hub-tag v1"
    advice = (
        r"run the same build with --resume \(every shard is finished: none is computed again\), "
        rf"or push the finished cache: `{re.escape(push)}`"
    )
    what = "commit card" if failing == "card" else "create tag"
    with pytest.raises(HubError, match=rf"(?s){what} on {repo} failed: the Hub kept failing .*; once it answers again, {advice}"):
        build(cfg, progress=False)
    hub.clear_faults()
    if failing == "card":  # each way out the message offers
        assert not build(cfg.replace(resume=True), progress=False).written
    else:
        assert main(shlex.split(push)[1:]) == 0, capsys.readouterr()
    assert "v1" in hub.repo(repo).tags
    assert_same_content(list(load_cache(repo, revision="v1", layout="raw")), decoded_rows(reference))


def test_the_push_a_failed_build_advises_sends_to_its_config_and_branch(hub, tmp_path, quick_upload_retries, capsys):
    """The advised command names every target flag the build was given: without --hub-config and --hub-branch it
    would push the cache to the repo's root on main, not where the build's shards are."""
    import re
    import shlex

    from builder.cli import main
    from builder.hub import HubError

    out, repo = tmp_path / "cache", "tester/failing-tag-of-a-config"
    cfg = small_config(out, max_samples=6, push_to_hub=repo, hub_config="llama", hub_branch="dev", hub_tag="v1")
    hub.add_fault("POST", r"/tag/", status=502, times=None)
    push = f"eagle3-cache push {out} {repo} --hub-config llama --hub-branch dev --hub-tag v1"
    with pytest.raises(HubError, match=rf"(?s)create tag on {repo} failed: .*, or push the finished cache: `{re.escape(push)}`$"):
        build(cfg, progress=False)
    hub.clear_faults()
    assert main(shlex.split(push)[1:]) == 0, capsys.readouterr()
    assert hub.repo(repo).tags["v1"] == hub.repo(repo).branches["dev"]
    assert_same_content(list(load_cache(repo, name="llama", revision="v1", layout="raw")), decoded_rows(out))
