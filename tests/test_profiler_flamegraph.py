"""Flame graphs from folded stacks: parsing, the plotly figure the dashboard shows, SVG and HTML files."""
import plotly.graph_objects as go
import pytest

from profiler.flamegraph import FoldedError, flame_figure, main, parse_folded, read_folded, svg_text

FOLDED = """\
ProfilerStep*;phase/rollout;aten::linear;aten::addmm 600
ProfilerStep*;phase/rollout;aten::linear;aten::addmm 400
ProfilerStep*;phase/update;aten::mm 3000
ProfilerStep*;phase/update 500
ProfilerStep*;phase/optimizer;aten::add_ 2
ProfilerStep* 100
"""


@pytest.fixture()
def folded(tmp_path):
    p = tmp_path / "w.folded"
    p.write_text(FOLDED)
    return p


def test_parse_sums_duplicates_and_reports_bad_lines():
    stacks, bad = parse_folded(FOLDED + "no value here\nx;y -3\n\nx;y nan\n")
    assert stacks[("ProfilerStep*", "phase/rollout", "aten::linear", "aten::addmm")] == 1000
    assert sum(stacks.values()) == 4602
    assert bad == [7, 8, 10]


def test_read_folded_skips_bad_lines_with_one_warning(tmp_path, capsys):
    p = tmp_path / "f.folded"
    p.write_text("a;b 5\ngarbage\n")
    assert read_folded(p) == {("a", "b"): 5.0}
    assert "skipped 1 malformed line(s), first at line 2" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, "", "only garbage\n"])
def test_missing_or_empty_file_is_a_one_line_error(tmp_path, content):
    p = tmp_path / "f.folded"
    if content is not None:
        p.write_text(content)
    with pytest.raises(FoldedError) as err:
        read_folded(p)
    assert "\n" not in str(err.value) and str(p) in str(err.value)


def test_flame_figure_is_an_icicle_rooted_at_the_bottom(folded):
    fig = flame_figure(folded, min_fraction=0)
    assert isinstance(fig, go.Figure)
    (trace,) = fig.data
    assert trace.type == "icicle" and trace.tiling.orientation == "v" and trace.tiling.flip == "y"
    nodes = dict(zip(trace.ids, trace.values))
    assert nodes["all"] == 4602
    assert nodes["all;ProfilerStep*;phase/update"] == 3500
    assert nodes["all;ProfilerStep*;phase/rollout;aten::linear;aten::addmm"] == 1000
    assert {"phase/rollout", "phase/update", "phase/optimizer"} <= set(trace.labels)
    for parent, value in zip(trace.parents, trace.values):  # branchvalues="total" needs children <= parent
        if parent:
            assert value <= nodes[parent]


def test_tiny_frames_are_hidden_but_still_counted(folded):
    (trace,) = flame_figure(folded, min_fraction=0.01).data
    assert "phase/optimizer" not in trace.labels and "aten::add_" not in trace.labels  # 2 of 4602
    nodes = dict(zip(trace.ids, trace.values))
    assert nodes["all"] == nodes["all;ProfilerStep*"] == 4602


def test_phase_frames_share_the_phase_colour(folded):
    (trace,) = flame_figure(folded).data
    colour = dict(zip(trace.ids, trace.marker.colors))
    assert colour["all;ProfilerStep*;phase/update"] == colour["all;ProfilerStep*;phase/update;aten::mm"]
    assert colour["all;ProfilerStep*;phase/update"] != colour["all;ProfilerStep*;phase/rollout"]


def test_svg_names_the_phases_with_tooltips(folded):
    svg = svg_text(read_folded(folded), title="t")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "<title>phase/update (3.500 ms, 76.05%" in svg
    assert ">phase/update<" in svg  # wide enough to carry its label


def test_cli_writes_svg_and_self_contained_html(folded, tmp_path, capsys):
    assert main([str(folded)]) == 0
    assert folded.with_suffix(".svg").read_text().startswith("<svg")
    out = tmp_path / "f.html"
    assert main([str(folded), "-o", str(out)]) == 0
    html = out.read_text()
    assert "aten::mm" in html and '<script src="https://cdn.plot.ly' not in html
    assert len(html) > 1_000_000  # plotly.js inlined


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.folded")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flamegraph: ") and err.count("\n") == 1


def test_latest_folded_picks_the_kind(tmp_path):
    import os

    from profiler.flamegraph import latest_folded

    assert latest_folded(tmp_path) is None
    for i, name in enumerate(["a.folded", "a.cuda.folded", "a.stacks.folded", "b.folded"]):
        (tmp_path / name).write_text("x 1\n")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert latest_folded(tmp_path).name == "b.folded"
    assert latest_folded(tmp_path, "cuda").name == "a.cuda.folded"
    assert latest_folded(tmp_path, "python").name == "a.stacks.folded"
    with pytest.raises(ValueError):
        latest_folded(tmp_path, "gpu")
