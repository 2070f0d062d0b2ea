"""The served query memory against real query-based attacks: ART's HopSkipJump sends its queries to a
real Triton server over gRPC and is flagged within a few queries, on both served models; a benign
stream of different digits, natural repeats included, is not flagged."""
import numpy as np
import pytest

from client.grpc_client import DetectorClient
from client.metrics import detector_counters
from export.evaluation.query_campaigns import benign_stream, run_campaigns, summarize
from model_repository.server import TritonServer
from model_repository.writer import ServingConfig, write_repository

GUARDED = {"guarded_classifier": "fingerprint_detector", "guarded_classifier_fused": "guarded_classifier_fused"}
SHORT_HSJ = {"norm": 2, "max_iter": 2, "max_eval": 40, "init_eval": 10, "init_size": 50}


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    out, _ = tiny_run
    assert (out / "query_memory.json").is_file()  # `nfp calibrate` of the main job calibrated its threshold
    repo = write_repository(out, tmp_path_factory.mktemp("repo") / "cpu", "cpu", ServingConfig(fused=True))
    with TritonServer(repo) as server:
        yield server


@pytest.mark.parametrize("model", GUARDED)
def test_a_benign_stream_with_natural_repeats_is_not_flagged(server, model, mnist):
    with DetectorClient(server.grpc_url, model) as client:
        before = detector_counters(server.metrics_url, GUARDED[model])
        benign = benign_stream(client, mnist.x[::16][:300], seed=1, batch=8)  # every class
        after = detector_counters(server.metrics_url, GUARDED[model])
    assert benign["distinct"] == 300 and benign["repeats"] == 30
    # The threshold flags 0.1% of the run's own benign stream; the server's hash key is fresh at each start,
    # so a look-alike pair of digits is sometimes flagged (1 of 300 under 12% of keys, 2 under 1%, never 3
    # in 200 keys), where a campaign's queries are flagged nearly all.
    assert benign["flagged_distinct"] <= 3 and benign["flagged_repeats"] == 0
    assert after["nfp_queries_total"] - before["nfp_queries_total"] == benign["queries"]
    assert after["nfp_query_flagged_total"] - before["nfp_query_flagged_total"] == benign["flagged_distinct"]


@pytest.mark.parametrize("model", GUARDED)
def test_a_real_hopskipjump_campaign_through_the_server_is_flagged_within_a_few_queries(server, model, mnist):
    with DetectorClient(server.grpc_url, model) as client:  # HopSkipJump starts from a misclassified noise image
        noise = np.bincount(client.detect(np.random.default_rng(0).random((20, 1, 28, 28), np.float32)).label,
                            minlength=10).argmax()
    pick = np.flatnonzero(mnist.y != noise)[[0, 600]]
    x, y = mnist.x[pick], mnist.y[pick]
    before = detector_counters(server.metrics_url, GUARDED[model])
    campaigns = run_campaigns(server.grpc_url, "HopSkipJump", x, y, 10, model=model, progress=False,
                              params=SHORT_HSJ)
    after = detector_counters(server.metrics_url, GUARDED[model])
    summary = summarize(campaigns)
    assert all(c.queries > 50 for c in campaigns)  # real campaigns: ART's own queries, counted by the server
    assert summary["flagged"] == 1.0 and summary["max_queries_to_first_flag"] <= 50, campaigns
    assert after["nfp_queries_total"] - before["nfp_queries_total"] == sum(c.queries for c in campaigns)
    assert after["nfp_query_flagged_total"] - before["nfp_query_flagged_total"] == sum(c.flags for c in campaigns)


def test_a_server_written_without_a_query_memory_answers_no_query_flagged(tiny_run, tmp_path, mnist):
    repo = write_repository(tiny_run[0], tmp_path / "cpu", "cpu", ServingConfig(watch_queries=False))
    with TritonServer(repo) as server, DetectorClient(server.grpc_url) as client:
        assert client.detect(np.repeat(mnist.x[:1], 3, axis=0)).query_flagged is None


def test_the_campaigns_command_serves_attacks_and_reports_them(tiny_run, tmp_path, capsys):
    """`nfp campaigns`: its own signed server, the benign stream, then each attack's campaigns."""
    import json
    import shutil

    from export.cli import main

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    assert main(["campaigns", "--out", str(out), "--count", "2", "--attacks", "BoundaryAttack", "--no-adaptive",
                 "--quiet"]) == 0
    report = json.loads((out / "report" / "campaigns.json").read_text())
    assert list(report["attacks"]) == ["BoundaryAttack"] and report["attacks"]["BoundaryAttack"]["campaigns"] == 2
    assert report["benign"]["distinct"] > 0
    assert "| BoundaryAttack | 2 |" in capsys.readouterr().out
