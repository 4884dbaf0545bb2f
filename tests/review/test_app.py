"""The review API over real HTTP (uvicorn on 127.0.0.1), with the queue and labels on S3 (moto's server) or disk:
auth, order and filters, leases that expire, disputes, look-alike groups, statistics and export."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import requests

from taxonet import registry
from taxonet import checkpoint as checkpoint_module
from taxonet.commands.review import TaxonomyReader, load_taxonomy
from taxonet.config import ConfigError
from taxonet.review import records
from taxonet.auth import load_tokens
from taxonet.review.leases import Leases
from taxonet.taxonomy import Taxonomy
from tests.checkpoint_support import tiny_checkpoint
from tests.review import test_stats
from tests.review.review_support import TAXONOMY, TOKEN, free_port, item, serving, session, write_queue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def s3_root(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/review"


def _queue() -> list:
    return [item("sure", "Apis mellifera", "species", reason="audit", source="cam-1"),
            item("fam-vesp", "Vespula vulgaris", "family", source="cam-2"),
            item("none", "Eristalis tenax", None, source="cam-1"),
            item("ord-api", "Bombus terrestris", "order", source="cam-1", confidence=0.2),
            item("ord-syr", "Eristalis tenax", "order", source="cam-2", confidence=0.1),
            item("ord-api2", "Apis mellifera", "order", source="cam-2", confidence=0.1)]


def _ids(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [crop["crop_id"] for crop in response.json()["crops"]]


def test_load_tokens(tmp_path) -> None:
    assert load_tokens({}) == ()
    assert load_tokens({"TAXONET_API_TOKEN": " a , b,, "}) == ("a", "b")
    token_file = tmp_path / "token"
    token_file.write_text("one\ntwo,three\n")
    assert load_tokens({"TAXONET_API_TOKEN_FILE": str(token_file)}) == ("one", "two", "three")
    assert load_tokens({"TAXONET_API_TOKEN": "a", "TAXONET_API_TOKEN_FILE": str(token_file)}) == (
        "a", "one", "two", "three")
    with pytest.raises(RuntimeError, match="cannot be read"):
        load_tokens({"TAXONET_API_TOKEN_FILE": str(tmp_path / "missing")})


def test_token_and_name_are_required(tmp_path) -> None:
    write_queue(str(tmp_path / "q"), _queue())
    with serving(str(tmp_path / "q"), str(tmp_path / "labels"), tokens=("first", TOKEN)) as url:
        assert requests.get(url + "/api/next").status_code == 401
        assert session("ana", token="wrong").get(url + "/api/next").status_code == 401
        assert session("ana").get(url + "/api/next").status_code == 200  # the second of two tokens
        bad = session("a b").get(url + "/api/next")
        assert bad.status_code == 400 and "reviewer" in bad.json()["error"]["message"]
        assert requests.get(url + "/api/crops/none/image").status_code == 401
        assert requests.get(url + "/").status_code == 200  # the page itself; its data needs the login
        # the page's login: cookies carry token and name; a form post (not JSON) is refused
        browser = requests.Session()
        assert browser.post(url + "/api/login", json={"token": "wrong", "name": "ana"}).status_code == 401
        assert browser.post(url + "/api/login", data={"token": TOKEN, "name": "ana"}).status_code == 415
        assert browser.get(url + "/api/session").json() == {"reviewer": None}
        assert browser.post(url + "/api/login", json={"token": TOKEN, "name": "ana"}).status_code == 200
        assert browser.get(url + "/api/me").json()["reviewer"] == "ana"
        assert browser.get(url + "/api/session").json() == {"reviewer": "ana"}
        image = browser.get(url + "/api/crops/none/image")
        assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"


def test_next_is_least_reliable_first_grouped_by_family_and_filters(tmp_path) -> None:
    write_queue(str(tmp_path / "q"), _queue())
    with serving(str(tmp_path / "q"), str(tmp_path / "labels")) as url:
        ana = session("ana")
        # no reliable rank, then reliable to order only (Apidae before Syrphidae, least confident first), ...
        assert _ids(ana.get(url + "/api/next")) == ["none", "ord-api2", "ord-api", "ord-syr", "fam-vesp", "sure"]
        assert _ids(ana.get(url + "/api/next", params={"family": "Apidae"})) == ["ord-api2", "ord-api", "sure"]
        assert _ids(ana.get(url + "/api/next", params={"source": "cam-2"})) == ["ord-api2", "ord-syr", "fam-vesp"]
        assert _ids(ana.get(url + "/api/next", params={"reason": "audit"})) == ["sure"]
        assert _ids(ana.get(url + "/api/next", params={"unsure_at": "family", "limit": 3})) == [
            "none", "ord-api2", "ord-api"]
        assert ana.get(url + "/api/next", params={"unsure_at": "genus"}).status_code == 400
        assert ana.get(url + "/api/next", params={"status": "maybe"}).status_code == 400
        assert ana.get(url + "/api/next", params={"limit": 0}).status_code == 400
        decided = ana.post(url + "/api/decisions", json={"crop_ids": ["ord-syr"], "kind": "reject"})
        assert decided.status_code == 200, decided.text
        assert "ord-syr" not in _ids(ana.get(url + "/api/next"))
        assert _ids(ana.get(url + "/api/next", params={"status": "mine"})) == ["ord-syr"]
        assert _ids(session("ben").get(url + "/api/next", params={"status": "mine"})) == []
        assert _ids(ana.get(url + "/api/next", params={"status": "reviewed"})) == ["ord-syr"]
        # a skipped crop goes to the back for its reviewer only
        assert ana.post(url + "/api/skip", json={"crop_ids": ["none"]}).status_code == 200
        assert "none" not in _ids(ana.get(url + "/api/next"))


def test_a_lease_keeps_a_crop_from_others_until_it_expires_or_is_decided(tmp_path) -> None:
    clock = FakeClock()
    write_queue(str(tmp_path / "q"), _queue())
    with serving(str(tmp_path / "q"), str(tmp_path / "labels"), leases=Leases(ttl_s=60, clock=clock)) as url:
        ana, ben = session("ana"), session("ben")
        assert _ids(ana.get(url + "/api/next", params={"limit": 2})) == ["none", "ord-api2"]
        assert _ids(ben.get(url + "/api/next", params={"limit": 2})) == ["ord-api", "ord-syr"]
        assert _ids(ana.get(url + "/api/next", params={"limit": 2})) == ["none", "ord-api2"]  # renewed, still hers
        assert ben.get(url + "/api/crops/none").json()["leased_by_other"] is True
        clock.now += 61  # ana closed her laptop: both leases run out
        assert _ids(ben.get(url + "/api/next", params={"limit": 3})) == ["none", "ord-api2", "ord-api"]
        assert _ids(ana.get(url + "/api/next", params={"limit": 2})) == ["ord-syr", "fam-vesp"]
        # a decision releases the lease at once (the crop is then reviewed, so only a "reviewed" view shows it)
        ben.post(url + "/api/decisions", json={"crop_ids": ["ord-api"], "kind": "accept"}).raise_for_status()
        assert "ord-api" in _ids(ana.get(url + "/api/next", params={"status": "reviewed"}))


def test_two_reviewers_who_disagree_leave_the_crop_disputed_with_both_on_s3(s3_root: str) -> None:
    queue, labels = s3_root + "/queue", s3_root + "/labels"
    write_queue(queue, _queue())
    with serving(queue, labels) as url:
        ana, ben = session("ana"), session("ben")
        first = ana.post(url + "/api/decisions", json={"crop_ids": ["ord-api"], "kind": "taxon", "rank": "species",
                                                         "taxon": "Bombus terrestris"})
        second = ben.post(url + "/api/decisions", json={"crop_ids": ["ord-api"], "kind": "new_species",
                                                          "rank": "family", "parent": "Apidae",
                                                          "provisional": "Apidae sp. A"})
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        view = ana.get(url + "/api/crops/ord-api").json()
        assert view["disputed"] is True and set(view["labels"]) == {"ana", "ben"}
        assert _ids(ana.get(url + "/api/next", params={"status": "disputed"})) == ["ord-api"]
    on_s3 = records.read_decisions(labels)
    assert [(d.reviewer, d.kind) for d in on_s3] == [("ana", "taxon"), ("ben", "new_species")]
    assert on_s3[0].batch_id == "20261201T090000000000-test" and on_s3[1].provisional == "Apidae sp. A"
    current = records.current_labels(on_s3)["ord-api"]
    assert records.is_disputed(current) and current["ana"].taxon == "Bombus terrestris"


def test_decisions_are_checked_idempotent_and_accept_goes_as_deep_as_the_selection_shares(tmp_path) -> None:
    labels = str(tmp_path / "labels")
    write_queue(str(tmp_path / "q"), _queue())
    with serving(str(tmp_path / "q"), labels) as url:
        ana = session("ana")

        def post(**body) -> requests.Response:
            return ana.post(url + "/api/decisions", json=body)

        assert post(crop_ids=["none"], kind="taxon", rank="species", taxon="Apis melifera").status_code == 400
        assert post(crop_ids=["none"], kind="new_species", rank="species", parent="Apis mellifera").status_code == 400
        assert post(crop_ids=["none"], kind="new_species", rank="family", parent="Apidea").status_code == 400
        assert post(crop_ids=["nope"], kind="reject").status_code == 404
        assert post(crop_ids=[], kind="reject").status_code == 400
        assert post(crop_ids=["none"], kind="maybe").status_code == 400
        assert ana.post(url + "/api/decisions", data="{", headers={"Content-Type": "application/json"}
                        ).status_code == 400
        assert records.read_decisions(labels) == []  # nothing bad was written
        # two Apidae answers (Bombus terrestris, Apis mellifera) share order and family: accept labels the family
        both = post(crop_ids=["ord-api", "ord-api2"], kind="accept", request_id="r1")
        assert both.status_code == 200, both.text
        assert {(d["crop_id"], d["rank"], d["taxon"]) for d in both.json()["decisions"]} == {
            ("ord-api", "family", "Apidae"), ("ord-api2", "family", "Apidae")}
        again = post(crop_ids=["ord-api", "ord-api2"], kind="accept", request_id="r1")  # a retried request
        assert [d["decision_id"] for d in again.json()["decisions"]] == [d["decision_id"]
                                                                          for d in both.json()["decisions"]]
        assert len(records.read_decisions(labels)) == 2
        one = post(crop_ids=["none"], kind="accept").json()["decisions"][0]
        assert (one["rank"], one["taxon"]) == ("species", "Eristalis tenax")  # one crop: its whole chain
        assert post(crop_ids=["none", "sure"], kind="accept").status_code == 409  # different orders: nothing shared
        post(crop_ids=["none"], kind="retract").raise_for_status()
        assert "none" not in records.current_labels(records.read_decisions(labels))


def test_type_ahead_searches_every_taxon(tmp_path) -> None:
    write_queue(str(tmp_path / "q"), _queue())
    with serving(str(tmp_path / "q"), str(tmp_path / "labels")) as url:
        ana = session("ana")
        found = ana.get(url + "/api/taxa", params={"q": "mellif"}).json()["taxa"]
        assert found == [{"rank": "species", "name": "Apis mellifera",
                          "chain": ["Hymenoptera", "Apidae", "Apis mellifera"]}]
        names = [t["name"] for t in ana.get(url + "/api/taxa", params={"q": "bo"}).json()["taxa"]]
        assert names[:2] == ["Bombus lapidarius", "Bombus terrestris"]  # names starting with the query first
        assert [t["name"] for t in ana.get(url + "/api/taxa", params={"q": "ap", "rank": "family"}).json()["taxa"]
                ] == ["Apidae"]


def test_look_alikes_are_offered_as_a_group(tmp_path) -> None:
    queue = [item("new-1", "Apis mellifera", "family", embedding=(1.0, 0.0, 0.1)),
             item("new-2", "Apis mellifera", "family", embedding=(0.98, 0.05, 0.1)),
             item("new-3", "Bombus terrestris", "family", embedding=(0.97, 0.0, 0.2)),
             item("other", "Apis mellifera", "family", embedding=(0.0, 1.0, 0.0)),
             # the same vector from another model version is in another embedding space: never grouped
             dataclasses.replace(item("v4", "Apis mellifera", "family", embedding=(1.0, 0.0, 0.1)),
                                 model_version="4")]
    write_queue(str(tmp_path / "q"), queue)
    with serving(str(tmp_path / "q"), str(tmp_path / "labels")) as url:
        # the group asked first, from a page that never listed the queue (a link, a reload): found all the same
        first = session("ben").get(url + "/api/crops/new-2/similar")
        assert first.status_code == 200 and [c["crop_id"] for c in first.json()["crops"]] == ["new-2", "new-1", "new-3"]
        session("ben").post(url + "/api/skip", json={"crop_ids": ["new-1", "new-2", "new-3"]})
        ana = session("ana")
        crops = {c["crop_id"]: c for c in ana.get(url + "/api/next").json()["crops"]}
        assert set(crops["new-1"]["similar"]) == {"new-2", "new-3"} and crops["other"]["similar"] == []
        assert crops["v4"]["similar"] == []
        group = ana.get(url + "/api/crops/new-1/similar").json()["crops"]
        assert [c["crop_id"] for c in group] == ["new-1", "new-2", "new-3"]
        named = ana.post(url + "/api/decisions", json={"crop_ids": ["new-1", "new-2", "new-3"], "kind": "new_species",
                                                        "rank": "family", "parent": "Apidae",
                                                        "provisional": "Apidae sp. B"})
        assert named.status_code == 200 and len(named.json()["decisions"]) == 3


def test_stats_and_export_through_the_api(s3_root: str) -> None:
    items, decisions = test_stats.example()
    queue, labels = s3_root + "/queue", s3_root + "/labels"
    write_queue(queue, items)
    for decision in decisions:
        records.write_decision(labels, decision)
    with serving(queue, labels) as url:
        ana = session("ana")
        body = ana.get(url + "/api/stats").json()
        ranks = {r["rank"]: r for r in body["agreement"]["ranks"]}
        assert (ranks["family"]["share"]["agree"], ranks["family"]["share"]["n"]) == (3, 4)
        assert ranks["family"]["kappa"] == pytest.approx(5 / 9)
        assert (body["agreement"]["exact"]["agree"], body["agreement"]["coarser"]["agree"]) == (2, 3)
        assert body["counts"] == {"queued": 6, "reviewed": 6}
        assert [t["reviewer"] for t in body["throughput"]] == ["ana", "ben"]
        exported = ana.get(url + "/api/export", params={"format": "csv"})
        assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert len(rows) == 7  # c5 has two current labels (disputed), every other crop one
        c5 = [r for r in rows if r["crop_id"] == "c5"]
        assert {r["reviewer"] for r in c5} == {"ana", "ben"} and {r["disputed"] for r in c5} == {"True"}
        c3 = next(r for r in rows if r["crop_id"] == "c3")
        assert (c3["kind"], c3["parent"], c3["model_species"]) == ("new_species", "Apidae", "Eristalis tenax")
        as_json = ana.get(url + "/api/export", params={"format": "json", "history": "1"}).json()["labels"]
        assert len(as_json) == len(decisions)
        assert ana.get(url + "/api/export", params={"format": "xml"}).status_code == 400


def test_cli_serves_the_page_with_the_token_from_a_file(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TAXONET_API_TOKEN", None)
    queue = str(tmp_path / "q")
    write_queue(queue, _queue())
    missing = subprocess.run([sys.executable, "-m", "taxonet.cli", "review", "serve", queue], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--taxonomy FILE or --model" in missing.stderr
    taxonomy = tmp_path / "taxonomy.json"
    taxonomy.write_text(TAXONOMY.to_json())
    (tmp_path / "token").write_text(f"old-token, {TOKEN}\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "taxonet.cli", "review", "serve", queue, "--taxonomy",
                                str(taxonomy), "--port", str(port)],
                               env={**env, "TAXONET_API_TOKEN_FILE": str(tmp_path / "token")},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                response = session("ana").get(url + "/api/me", timeout=5)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "the review server did not start"
                time.sleep(0.2)
        assert response.status_code == 200 and response.json()["queued"] == 6
        assert requests.get(url + "/api/me", headers={"X-Reviewer": "ana"}, timeout=5).status_code == 401
        session("ana").post(url + "/api/decisions", json={"crop_ids": ["none"], "kind": "reject"}).raise_for_status()
        assert [d.kind for d in records.read_decisions(str(tmp_path / "q" / "labels"))] == ["reject"]  # the default
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_the_taxonomy_comes_from_a_file_or_a_published_model(tmp_path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    registry.publish(str(checkpoint), str(tmp_path / "models"), "demo")
    registry.promote(str(tmp_path / "models"), "demo", 1, "production")
    assert load_taxonomy(None, f"{tmp_path / 'models'}/demo@production").rows() == TAXONOMY.rows()
    (tmp_path / "taxa.csv").write_text("order,family,species\nDiptera,Syrphidae,Eristalis tenax\n")
    assert list(load_taxonomy(str(tmp_path / "taxa.csv"), None).names[2]) == ["Eristalis tenax"]
    with pytest.raises(ConfigError, match="--taxonomy FILE"):
        load_taxonomy(None, None)


def test_the_page_reads_a_models_taxonomy_again_only_after_a_promote(tmp_path, monkeypatch) -> None:
    models = str(tmp_path / "models")
    registry.publish(str(tiny_checkpoint(tmp_path / "v1")), models, "demo")
    grown = Taxonomy.from_rows(TAXONOMY.rows() + [("Diptera", "Syrphidae", "Volucella zonaria")])
    registry.publish(str(tiny_checkpoint(tmp_path / "v2", taxonomy=grown)), models, "demo")
    registry.promote(models, "demo", 1, "production")
    reads = []
    real = checkpoint_module.read_listed_json
    monkeypatch.setattr(checkpoint_module, "read_listed_json",
                        lambda uri, name, *a, **k: reads.append((uri, name)) or real(uri, name, *a, **k))
    reader = TaxonomyReader(None, f"{models}/demo@production")
    first = reader()
    assert first.rows() == TAXONOMY.rows() and len(reads) == 1
    assert reader() is first and reader() is first and len(reads) == 1  # refreshes with the alias unchanged
    registry.promote(models, "demo", 2, "production", allow_taxonomy_change=True)
    assert reader().rows() == grown.rows() and len(reads) == 2
    assert reads[-1][0] == registry.version_uri(models, "demo", 2)
    # a file: parsed again only when its bytes change
    taxa = tmp_path / "taxa.csv"
    taxa.write_text("order,family,species\nDiptera,Syrphidae,Eristalis tenax\n")
    from_file = TaxonomyReader(str(taxa), None)
    assert from_file() is from_file() and list(from_file().names[2]) == ["Eristalis tenax"]
    taxa.write_text("order,family,species\nDiptera,Syrphidae,Eristalis tenax\nDiptera,Syrphidae,Volucella zonaria\n")
    assert list(from_file().names[2]) == ["Eristalis tenax", "Volucella zonaria"]
    with pytest.raises(ConfigError, match="--taxonomy FILE"):
        TaxonomyReader(None, None)()


def test_a_promote_that_adds_a_species_reaches_the_running_page(tmp_path) -> None:
    """The loop's new class: the page follows ``--model MODELS/NAME@production``; once a version whose taxonomy
    has one more species is promoted, reviewers find and pick it without a restart. A taxonomy that cannot be read
    (a broken alias) keeps the one in use."""
    models = str(tmp_path / "models")
    registry.publish(str(tiny_checkpoint(tmp_path / "v1")), models, "demo")
    registry.promote(models, "demo", 1, "production")
    grown = Taxonomy.from_rows([*TAXONOMY.rows(), ["Hymenoptera", "Apidae", "Apis nova"]], TAXONOMY.ranks)
    registry.publish(str(tiny_checkpoint(tmp_path / "v2", taxonomy=grown)), models, "demo")
    queue = str(tmp_path / "q")
    write_queue(queue, _queue())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TAXONET_API_TOKEN": TOKEN}
    env.pop("TAXONET_API_TOKEN_FILE", None)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "taxonet.cli", "review", "serve", queue, "--model",
                                f"{models}/demo@production", "--port", str(port), "--refresh-s", "0.2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, ana = f"http://127.0.0.1:{port}", session("ana")

    def found(query: str) -> list[str]:
        response = ana.get(url + "/api/taxa", params={"q": query}, timeout=10)
        assert response.status_code == 200, response.text
        return [taxon["name"] for taxon in response.json()["taxa"]]

    def name_it(taxon: str) -> requests.Response:
        return ana.post(url + "/api/decisions", json={"crop_ids": ["ord-api"], "kind": "taxon", "rank": "species",
                                                      "taxon": taxon}, timeout=10)

    def wait_until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    try:
        def started() -> bool:
            try:
                return ana.get(url + "/api/me", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(started, "the review server did not start")
        assert found("nova") == [] and found("mellif") == ["Apis mellifera"]
        assert name_it("Apis nova").status_code == 400  # not a taxon of the model in production yet
        registry.promote(models, "demo", 2, "production", allow_taxonomy_change=True)
        wait_until(lambda: found("nova") == ["Apis nova"], "the promoted taxonomy's new species was never offered")
        assert name_it("Apis nova").status_code == 200
        (tmp_path / "models" / "demo" / "aliases" / "production.json").write_text("{broken")
        time.sleep(1.0)  # several refreshes, each failing to read the alias
        assert found("nova") == ["Apis nova"] and process.poll() is None
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert "the taxonomy changed" in output and "could not be re-read" in output
    assert [(d.kind, d.taxon) for d in records.read_decisions(str(tmp_path / "q" / "labels"))] == [
        ("taxon", "Apis nova")]
