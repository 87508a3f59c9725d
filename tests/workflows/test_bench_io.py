"""The input-pipeline benchmarks on their quick settings: every figure exists, and the ones that do not depend on how
busy the machine is meet the acceptance bars (bytes read per input, J2K speed-up and score change, memory growth)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loupe.workflows import bench_io


@pytest.fixture(scope="module")
def sections(shared_data: Path) -> dict:
    return bench_io.io_sections_in_child(quick=True)  # as `loupe bench speed --io` runs it


def test_io_sections_report_every_figure(sections: dict) -> None:
    assert set(sections) >= {"e2e_vs_model", "j2k_reduced_vs_full", "read_once", "memory_over_batches", "acceptance"}
    run = sections["e2e_vs_model"]["runs"]["vit_tiny_patch16"]
    assert run["inputs"] == 64 and run["scoring_img_s"] > 0 and run["bare_forward_img_s"] > 0
    assert run["ratio_scoring_over_bare"] == pytest.approx(run["scoring_img_s"] / run["bare_forward_img_s"])
    assert sections["e2e_vs_model"]["worst_ratio"] == run["median_ratio"] == run["ratio_scoring_over_bare"]
    cpu = sections["e2e_vs_model"]["cpu"]["vit_tiny_patch16"]
    # reading a 512² PNG film (identity, decode, resize) costs a small part of even ViT-Ti's forward
    assert 0 < cpu["read_cpu_s_per_image"] < 0.25 * cpu["forward_cpu_s_per_image"]
    assert cpu["cpu_bound_ratio"] == sections["e2e_vs_model"]["worst_cpu_bound_ratio"] > 0.8


def test_j2k_chest_film_is_read_reduced_5x_faster_with_the_same_score(sections: dict) -> None:
    j2k = sections["j2k_reduced_vs_full"]
    chest = j2k["files"]["RG1_J2KR"]
    assert chest["full_shape"] == [1955, 1841] and chest["reduced_shape"] == [245, 231]
    assert chest["decode_scale"] == 1 / 8 and chest["speedup"] == j2k["chest_film_speedup"] >= 5
    assert "SIIM_chest_as_J2K" in j2k["files"]  # the shared chest film, transcoded
    assert j2k["max_score_change"] < 0.01
    assert sections["acceptance"]["j2k_reduced_at_least_5x_faster"] is True


def test_identity_and_decoding_read_each_input_once(sections: dict) -> None:
    once = sections["read_once"]
    assert once["files"] == 33  # 32 NIH films and the J2K chest film
    assert 1.9 < once["before"]["bytes_read_over_size"] < 2.2  # hashed, then decoded from the file again
    assert 0.99 < once["after"]["bytes_read_over_size"] < 1.05


def test_memory_stays_flat_over_50_batches(sections: dict) -> None:
    mem = sections["memory_over_batches"]
    assert mem["batches"] >= 50 and mem["rows_ok"] == 200
    assert len(mem["peak_tree_rss_mib"]) == mem["batches"] and min(mem["peak_tree_rss_mib"]) > 50
    assert mem["growth"] < 0.05 and sections["acceptance"]["memory_growth_below_5pct"] is True


def test_missing_nih_films_are_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOUPE_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cxr/nih14/images.*LOUPE_SHARED_DATA"):
        bench_io.nih_pngs()
