"""The example workflows in workflows/ (UI format, what people drag into ComfyUI) and the UI -> API
converter the tests run them with (tests/comfyui_workflow.py).

Without ComfyUI (CI): the converter against small schemas, the files' structure, and that each names
its model files in its note and in docs/comfyui.md. With COMFYUI_PATH (else skipped: "COMFYUI_PATH is
not set"), against one real `--cpu` server with this pack:
- the demo workflow, converted with the server's /object_info, runs to an 8-frame mp4 (its model is a
  tiny stand-in with the demo's file name in models/skipdit/, or the real bundled model when
  skipdit_core/assets/ has it); the others, whose weights are downloads, pass the server's validation
  except for exactly the model files they name;
- /workflow_templates lists them all and serves them;
- headless Chromium with the server's own frontend loads each with no missing node, builds the same
  API prompt as the converter, and serialises it to the file's own nodes (skipped with the reason when
  node, Chromium or puppeteer-core is missing; $SKIPDIT_BROWSER_TOOLS names the npm folder with
  puppeteer-core, default tests/browser (pinned in its package.json, `npm ci`); $CHROME_PATH the browser,
  default /usr/bin/chromium; $SKIPDIT_FRONTEND_ROOT a frontend to serve instead of the server's own, e.g.
  the static/ folder of comfyui-frontend-package 1.58.1, the 0.38-era frontend).
  The demo workflow's screenshot is copied to /tmp/skipdit-demo-workflow.png.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import subprocess
import urllib.error
from pathlib import Path

import pytest

from comfyui_workflow import MODEL_FILE_INPUTS, Node, WorkflowError, build_workflow, note, ui_to_api, widget_layout, widget_values

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
NAMES = {p.stem for p in WORKFLOWS}
DEMO = "skipdit-demo-moving-shapes"
NO_DOWNLOAD = {DEMO}  # workflows whose every model ships with the pack
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
needs_comfyui = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set")
SCREENSHOT = Path("/tmp/skipdit-demo-workflow.png")


def load(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def bundled_files() -> set[str]:
    """The model files a fresh server has: those bundled with the pack."""
    return {p.name for p in (ROOT / "skipdit_core" / "assets").glob("*.safetensors")}


def model_files(workflow: dict) -> dict[str, str]:
    """{file name: node type} of the model-file widgets of a workflow."""
    out = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        for name, value in zip(LOADER_WIDGETS.get(node["type"], ()), node["widgets_values"]):
            if name in MODEL_FILE_INPUTS:
                out[value] = node["type"]
    return out


# The widget names of the loaders used in workflows/ (their first widgets), for checks without a server.
LOADER_WIDGETS = {
    "SkipDiTModelLoader": ("checkpoint", "weight_dtype"),
    "SkipDiTLoadSkipBranches": ("branches",),
    "UNETLoader": ("unet_name", "weight_dtype"),
    "CheckpointLoaderSimple": ("ckpt_name",),
    "CLIPLoader": ("clip_name", "type", "device"),
    "VAELoader": ("vae_name",),
}


# ----------------------------------------------------------------------------- the converter (CI)

SCHEMAS = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.pt", "b.pt"], {}]}}, "input_order": {"required": ["ckpt_name"]},
               "output": ["MODEL"], "output_name": ["MODEL"], "display_name": "Loader"},
    "Sampler": {
        "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
                               "steps": ["INT", {"default": 20}], "name": ["COMBO", {"options": ["x", "y"]}],
                               "latent": ["LATENT", {}]},
                  "optional": {"noise_seed": ["INT", {"default": 1}], "flag": ["BOOLEAN", {"default": False}],
                               "extra": ["MODEL", {}], "forced": ["FLOAT", {"forceInput": True}]}},
        "input_order": {"required": ["model", "seed", "steps", "name", "latent"],
                        "optional": ["noise_seed", "flag", "extra", "forced"]},
        "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "Sampler"},
    "Empty": {"input": {"required": {"size": ["INT", {"default": 8, "min": 8, "max": 64}],
                                     "seed": ["INT", {"default": 0, "control_after_generate": False}]}},
              "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "Empty"},
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "strength": ["FLOAT", {"default": 1.0}]}},
              "output": ["MODEL"], "output_name": ["MODEL"], "display_name": "Patch"},
    "Int": {"input": {"required": {"value": ["INT", {"default": 3}]}}, "output": ["INT"], "output_name": ["INT"], "display_name": "Int"},
}


def small_graph() -> dict:
    nodes = [
        Node(1, "Loader", (0, 0), {"ckpt_name": "b.pt"}),
        Node(2, "Empty", (0, 200), {"size": 16, "seed": 3}),
        Node(3, "Patch", (300, 0), {"strength": 0.5}, {"model": (1, 0)}),
        Node(4, "Sampler", (600, 0), {"seed": 42, "steps": 7, "name": "y", "noise_seed": 5}, {"model": (3, 0), "latent": (2, 0)},
             control="randomize"),
    ]
    return build_workflow(nodes, SCHEMAS, (note(5, (0, 400), "hello"),))


def test_widget_layout_follows_the_frontend():
    assert widget_layout(SCHEMAS["Sampler"]) == [
        ("seed", SCHEMAS["Sampler"]["input"]["required"]["seed"]), (None, SCHEMAS["Sampler"]["input"]["required"]["seed"]),
        ("steps", SCHEMAS["Sampler"]["input"]["required"]["steps"]), ("name", SCHEMAS["Sampler"]["input"]["required"]["name"]),
        # an optional INT named noise_seed gets a control widget by name; forceInput makes a socket
        ("noise_seed", SCHEMAS["Sampler"]["input"]["optional"]["noise_seed"]),
        (None, SCHEMAS["Sampler"]["input"]["optional"]["noise_seed"]),
        ("flag", SCHEMAS["Sampler"]["input"]["optional"]["flag"]),
    ]
    assert [n for n, _ in widget_layout(SCHEMAS["Empty"])] == ["size", "seed"]  # control_after_generate False


def test_build_then_convert():
    wf = small_graph()
    assert wf["version"] == 0.4 and wf["last_node_id"] == 5 and wf["last_link_id"] == 3
    sampler = next(n for n in wf["nodes"] if n["id"] == 4)
    assert sampler["widgets_values"] == [42, "randomize", 7, "y", 5, "randomize", False]
    # sockets first, then widget inputs; optional ones drawn hollow (shape 7)
    assert [i["name"] for i in sampler["inputs"]][:4] == ["model", "latent", "extra", "forced"]
    assert sampler["inputs"][2]["shape"] == 7 and "shape" not in sampler["inputs"][0]
    assert wf["links"] == [[1, 1, 0, 3, 0, "MODEL"], [2, 3, 0, 4, 0, "MODEL"], [3, 2, 0, 4, 1, "LATENT"]]
    assert ui_to_api(wf, SCHEMAS) == {
        "1": {"class_type": "Loader", "inputs": {"ckpt_name": "b.pt"}, "_meta": {"title": "Loader"}},
        "2": {"class_type": "Empty", "inputs": {"size": 16, "seed": 3}, "_meta": {"title": "Empty"}},
        "3": {"class_type": "Patch", "inputs": {"model": ["1", 0], "strength": 0.5}, "_meta": {"title": "Patch"}},
        "4": {"class_type": "Sampler", "inputs": {"model": ["3", 0], "seed": 42, "steps": 7, "name": "y", "latent": ["2", 0],
                                                  "noise_seed": 5, "flag": False}, "_meta": {"title": "Sampler"}},
    }  # the Note is frontend-only; unlinked optional sockets are left out


def test_convert_bypass_mute_reroute_and_linked_widgets():
    wf = small_graph()
    nodes = {n["id"]: n for n in wf["nodes"]}
    bypassed = copy.deepcopy(wf)
    {n["id"]: n for n in bypassed["nodes"]}[3]["mode"] = 4  # Patch bypassed: the sampler gets the loader's MODEL
    assert ui_to_api(bypassed, SCHEMAS)["4"]["inputs"]["model"] == ["1", 0] and "3" not in ui_to_api(bypassed, SCHEMAS)
    muted = copy.deepcopy(wf)
    {n["id"]: n for n in muted["nodes"]}[2]["mode"] = 2
    with pytest.raises(WorkflowError, match="required input 'latent'"):
        ui_to_api(muted, SCHEMAS)
    # A reroute between the loader and Patch, and the sampler's steps widget fed by a link from Empty.
    rerouted = copy.deepcopy(wf)
    rerouted["nodes"].append({"id": 6, "type": "Reroute", "pos": [0, 0], "mode": 0, "inputs": [{"name": "", "type": "*", "link": 4}],
                              "outputs": [{"name": "", "type": "MODEL", "links": [1]}], "properties": {}})
    rerouted["links"] = [[1, 6, 0, 3, 0, "MODEL"], *wf["links"][1:], [4, 1, 0, 6, 0, "MODEL"]]
    api = ui_to_api(rerouted, SCHEMAS)
    assert api["3"]["inputs"]["model"] == ["1", 0] and "6" not in api
    assert nodes[4]["widgets_values"][2] == 7
    # A widget input fed by a link keeps its entry in widgets_values; the link wins.
    linked = build_workflow([Node(1, "Int", (0, 0), {"value": 9}), Node(2, "Loader", (0, 0)), Node(3, "Empty", (0, 0)),
                             Node(4, "Sampler", (0, 0), {"steps": 7}, {"steps": (1, 0), "model": (2, 0), "latent": (3, 0)})], SCHEMAS)
    sampler = next(n for n in linked["nodes"] if n["id"] == 4)
    assert sampler["widgets_values"][2] == 7 and next(i for i in sampler["inputs"] if i["name"] == "steps")["link"] == 1
    assert ui_to_api(linked, SCHEMAS)["4"]["inputs"]["steps"] == ["1", 0]


def test_convert_errors_name_the_problem():
    wf = small_graph()
    bad = copy.deepcopy(wf)
    {n["id"]: n for n in bad["nodes"]}[4]["widgets_values"].append(1)
    with pytest.raises(WorkflowError, match=r"node 4 \(Sampler\): 8 widget values for 7 widgets"):
        ui_to_api(bad, SCHEMAS)
    with pytest.raises(WorkflowError, match="unknown to this ComfyUI: \\['Sampler'\\]"):
        ui_to_api(wf, {k: v for k, v in SCHEMAS.items() if k != "Sampler"})
    crossed = copy.deepcopy(wf)
    crossed["links"][2][5] = "IMAGE"
    with pytest.raises(WorkflowError, match="input 'latent' is LATENT, linked to IMAGE"):
        ui_to_api(crossed, SCHEMAS)
    with pytest.raises(WorkflowError, match="outside 8..64"):
        build_workflow([Node(1, "Empty", (0, 0), {"size": 100})], SCHEMAS)
    with pytest.raises(WorkflowError, match="not one of"):
        build_workflow([Node(1, "Sampler", (0, 0), {"name": "z"})], SCHEMAS)
    with pytest.raises(WorkflowError, match="wants LATENT"):
        build_workflow([Node(1, "Loader", (0, 0)), Node(2, "Sampler", (0, 0), {}, {"latent": (1, 0)})], SCHEMAS)


# ComfyUI 0.38's CreateVideo (new optional widgets) and SaveVideo (`format` a dynamic combo with a nested
# `codec`, and a hidden optional `codec`), as its /object_info gives them (see the file's _doc).
V038_VIDEO_FILE = ROOT / "tests" / "data" / "object_info-0.38-video.json"
V038_VIDEO = {k: v for k, v in json.loads(V038_VIDEO_FILE.read_text()).items() if k != "_doc"}
# ComfyUI 0.33's schemas of the core nodes the workflows use: what the shipped files are written for. Other
# versions differ in three of them (SaveImage: an IMAGE output; CreateVideo: an optional bit_depth; SaveVideo: a
# dynamic-combo format with an optional codec and a VIDEO output, all since 0.3.64).
V033_CORE_FILE = ROOT / "tests" / "data" / "object_info-0.33-core.json"
V033_CORE = {k: v for k, v in json.loads(V033_CORE_FILE.read_text()).items() if k != "_doc"}
CHANGED_SINCE_0_3_64 = {"SaveImage", "CreateVideo", "SaveVideo"}
IMAGES = {"Images": {"input": {"required": {}}, "output": ["IMAGE"], "output_name": ["IMAGE"], "display_name": "Images"}}


def video_graph(save_widgets: dict, fps: float = 8.0) -> dict:
    nodes = [Node(1, "Images", (0, 0)), Node(2, "CreateVideo", (300, 0), {"fps": fps}, {"images": (1, 0)}),
             Node(3, "SaveVideo", (600, 0), {"filename_prefix": "video/x", **save_widgets}, {"video": (2, 0)})]
    return build_workflow(nodes, IMAGES | V038_VIDEO)


def test_0_38_video_nodes_lay_out_dynamic_combos_as_the_frontend_does():
    wf = video_graph({})
    create, save = (next(n for n in wf["nodes"] if n["id"] == i) for i in (2, 3))
    assert create["widgets_values"] == [8.0, "auto", "sRGB", "none"]  # fps, then the three new optional widgets
    # format, then its chosen option's codec right after it, then the hidden optional codec
    assert save["widgets_values"] == ["video/x", "auto", "auto", "auto"]
    assert [i["name"] for i in save["inputs"]] == ["video", "filename_prefix", "format", "format.codec", "codec"]
    api = ui_to_api(wf, IMAGES | V038_VIDEO)
    assert api["3"]["inputs"] == {"video": ["2", 0], "filename_prefix": "video/x", "format": "auto", "format.codec": "auto", "codec": "auto"}
    assert api["2"]["inputs"] == {"images": ["1", 0], "fps": 8.0, "bit_depth": "auto", "color_space": "sRGB", "codec": "none"}


def test_0_38_nested_dynamic_combo_by_position_and_by_name():
    chosen = {"format": "mkv", "format.codec": "av1", "format.codec.encoding": "re-encode", "format.codec.encoding.crf": 20.0}
    wf = video_graph(chosen)
    save = next(n for n in wf["nodes"] if n["id"] == 3)
    assert save["widgets_values"] == ["video/x", "mkv", "av1", "re-encode", 20.0, "auto"]
    expected = {"video": ["2", 0], "filename_prefix": "video/x", **chosen, "codec": "auto"}
    assert ui_to_api(wf, IMAGES | V038_VIDEO)["3"]["inputs"] == expected
    # frontend 1.58's widgets_values_named, with the positional list left out
    save["widgets_values_named"] = dict(zip(["filename_prefix", *chosen, "codec"], save.pop("widgets_values")))
    assert ui_to_api(wf, IMAGES | V038_VIDEO)["3"]["inputs"] == expected
    with pytest.raises(WorkflowError, match=r"outside 0.0..63.0"):
        video_graph({**chosen, "format.codec.encoding.crf": 70.0})
    with pytest.raises(WorkflowError, match=r"SaveVideo has no widgets \['format.codec.encoding'\]"):
        video_graph({"format": "mp4", "format.codec": "auto", "format.codec.encoding": "auto"})  # auto has no encoding


def test_0_38_dynamic_combo_values_that_fit_no_option_are_named():
    wf = video_graph({})
    save = next(n for n in wf["nodes"] if n["id"] == 3)
    save["widgets_values"] = ["video/x", "avi", "auto", "auto"]
    with pytest.raises(WorkflowError, match=r"node 3 \(SaveVideo\): format is 'avi', not one of \['auto', 'mp4', 'mkv', 'webm'\]"):
        ui_to_api(wf, IMAGES | V038_VIDEO)
    save["widgets_values"] = ["video/x", "webm", "h264", "auto"]
    with pytest.raises(WorkflowError, match=r"format.codec is 'h264', not one of \['auto', 'av1'\]"):
        ui_to_api(wf, IMAGES | V038_VIDEO)


def test_shipped_video_nodes_read_under_the_0_38_schemas():
    """The workflows' CreateVideo / SaveVideo are written against 0.33 (CreateVideo: fps, bit_depth; SaveVideo:
    filename_prefix, format, format.codec, codec). Under 0.38's schemas the same values fill the same places
    (bit_depth is a combo there, of which 8 is an option); the widgets 0.38 added take their defaults."""
    seen = 0
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] not in V038_VIDEO:
                continue
            seen += 1
            values, _ = widget_values(node["id"], node["type"], V038_VIDEO[node["type"]], node["widgets_values"])
            if node["type"] == "CreateVideo":
                fps, bit_depth = node["widgets_values"]
                assert values == {"fps": fps, "bit_depth": bit_depth, "color_space": "sRGB", "codec": "none"}
            else:
                prefix, fmt, format_codec, codec = node["widgets_values"]
                assert values == {"filename_prefix": prefix, "format": fmt, "format.codec": format_codec, "codec": codec}
    assert seen == 10  # the five video workflows, both nodes each (the two image ones have neither)


# ----------------------------------------------------------------------------- the files (CI)


def test_the_seven_workflows_exist():
    assert NAMES == {DEMO, "latte-t2v-skip-cache", "latte-ucf101-class-to-video", "dit-class-to-image",
                     "hunyuan-dit-text-to-image", "wan2.1-t2v-1.3B-skip-cache", "wan2.1-t2v-1.3B-skip-branches"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_file_is_consistent_ui_json(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max((link[0] for link in wf["links"]), default=0)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, a, a_slot, b, b_slot, kind in wf["links"]:
        out = nodes[a]["outputs"][a_slot]
        assert link_id in out["links"] and out["type"] == kind
        inp = nodes[b]["inputs"][b_slot]
        assert inp["link"] == link_id and inp["type"] == kind
    linked = sorted(i["link"] for n in wf["nodes"] for i in n.get("inputs", []) if i.get("link") is not None)
    assert linked == sorted(link[0] for link in wf["links"])
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for file in model_files(wf):  # each workflow names the files it expects, in its note
        assert file in text, f"{path.name}: {file} not in its note"


def test_docs_table_names_every_workflow_and_file():
    docs = (ROOT / "docs" / "comfyui.md").read_text()
    for path in WORKFLOWS:
        assert f"`{path.name}`" in docs
        for file in model_files(json.loads(path.read_text())):
            assert f"`{file}`" in docs, f"{file} ({path.name}) is not in docs/comfyui.md"


def test_demo_workflow_is_the_demo_command():
    from skipdit_core import demo

    wf = load(DEMO)
    by_type = {n["type"]: n for n in wf["nodes"]}
    assert by_type["SkipDiTModelLoader"]["widgets_values"][0] == demo.DEMO_MODEL.name
    assert 0 <= by_type["SkipDiTClassLabel"]["widgets_values"][0] < len(demo.SHAPE_CLASSES)
    (interval, settings, unit, start, end, depth, forecast, damping, empty, warmup, reuse,
     preset) = by_type["SkipDiTApplySkipCache"]["widgets_values"]
    assert preset == "off"  # the demo is the paper's rule, as skipdit demo, not a preset
    assert (interval, settings) == (demo.DEMO_CACHE.interval, "auto")  # auto: Latte's authors' window
    assert (start, end, depth) == (demo.DEMO_CACHE.start, demo.DEMO_CACHE.end, demo.DEMO_CACHE.depth)
    assert forecast == demo.DEMO_CACHE.forecast == 0  # the paper's reuse, as skipdit demo
    assert damping == demo.DEMO_CACHE.forecast_damping == 1.0
    assert (empty, warmup) == (demo.DEMO_CACHE.empty_steps, demo.DEMO_CACHE.forecast_warmup) == (0, False)
    assert reuse == demo.DEMO_CACHE.reuse == "state"
    defaults = inspect.signature(demo.run_demo).parameters
    seed, control, steps, cfg, sampler, scheduler, denoise = by_type["KSampler"]["widgets_values"]
    assert (steps, cfg, control, denoise) == (defaults["steps"].default, defaults["guidance"].default, "fixed", 1.0)
    assert (sampler, scheduler) == ("ddim", "ddim_uniform") and defaults["sampler"].default == "ddim"
    assert by_type["SkipDiTEmptyLatteLatent"]["widgets_values"] == [16, 16, 8, 1, "pixels (3 ch)"]
    assert by_type["ImageScale"]["widgets_values"] == ["nearest-exact", 128, 128, "disabled"]  # 8x, to be seen
    assert by_type["CreateVideo"]["widgets_values"] == [8.0, 8]  # fps, bit_depth
    assert set(model_files(wf)) == {demo.DEMO_MODEL.name}  # nothing to download


# ----------------------------------------------------------------------------- a real ComfyUI


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from comfyui_server import make_base_dir, write_model
    from skipdit_core import demo

    base = make_base_dir(tmp_path_factory.mktemp("comfy-workflows"))
    if not demo.DEMO_MODEL.exists():
        # A tiny random stand-in of the demo model's shape (pixel-space class-conditional Latte, 16x16,
        # 8 frames, 4 classes, learned sigma, long skips) under its file name; never written into
        # skipdit_core/assets/.
        write_model(base / "models/skipdit" / demo.DEMO_MODEL.name, "latte", "Latte-tiny", in_channels=3, input_size=16,
                    patch_size=4, num_frames=8, num_classes=4, learn_sigma=True, skip=True, depth=8, hidden_size=32, num_heads=2)
    return base


@pytest.fixture(scope="module")
def server(base_dir):
    from comfyui_server import Server

    with Server(base_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


@pytest.fixture(scope="module")
def comfyui_version(server) -> str:
    return server.get("/system_stats")["system"]["comfyui_version"]


def without_file_lists(schema: dict) -> dict:
    """A schema with its model-file choices emptied (they list what one installation has)."""
    schema = copy.deepcopy(schema)
    for section in ("required", "optional"):
        for name, spec in schema["input"].get(section, {}).items():
            if name in MODEL_FILE_INPUTS:
                spec[0] = [] if isinstance(spec[0], list) else spec[0]
                if len(spec) > 1 and "options" in spec[1]:
                    spec[1]["options"] = []
    return schema


# The core nodes whose layout in a workflow (sockets, widgets, outputs) differs between a version's schemas and
# 0.33's, by version: what the shipped files legitimately differ in from a file written on that version.
LAYOUT_CHANGES = {"0.33.0": set(), "0.3.64": CHANGED_SINCE_0_3_64}


@needs_comfyui
def test_the_workflow_descriptions_build_against_both_versions(object_info, comfyui_version):
    """tests/make_workflows.py writes the seven shipped files from 0.33's schemas of the core nodes and this
    server's of the pack's, on every version; on 0.33 those stored schemas are the server's own. Built from this
    server's schemas alone, exactly the core nodes that changed between its version and 0.33 come out otherwise.
    With 0.38's video nodes (dynamic combos) each converts."""
    import make_workflows

    if comfyui_version == "0.33.0":
        for node_type, schema in V033_CORE.items():
            assert without_file_lists(object_info[node_type]) == without_file_lists(schema), f"{V033_CORE_FILE.name}: {node_type}"
    differing = set()
    for name, make in make_workflows.WORKFLOWS.items():
        nodes, notes = make()
        assert build_workflow(nodes, object_info | V033_CORE, notes) == load(name), f"workflows/{name}.json is not what make_workflows.py writes"
        here = {n["id"]: n for n in build_workflow(nodes, object_info, notes)["nodes"]}
        differing |= {n["type"] for n in load(name)["nodes"] if here[n["id"]] != n}
        newer = build_workflow(nodes, object_info | V038_VIDEO, notes)
        api = ui_to_api(newer, object_info | V038_VIDEO)
        for node in api.values():
            if node["class_type"] == "SaveVideo":
                assert (node["inputs"]["format"], node["inputs"]["format.codec"], node["inputs"]["codec"]) == ("auto", "auto", "auto")
    if comfyui_version in LAYOUT_CHANGES:
        assert differing == LAYOUT_CHANGES[comfyui_version], comfyui_version


@needs_comfyui
def test_workflow_templates_lists_and_serves_them(server):
    from comfyui_server import PACK_NAME

    listed = server.get("/workflow_templates")
    assert set(listed[PACK_NAME]) == NAMES
    for path in WORKFLOWS:
        assert server.get_bytes(f"/api/workflow_templates/{PACK_NAME}/{path.name}") == path.read_bytes()


@needs_comfyui
def test_demo_workflow_runs_to_an_8_frame_video(server, base_dir, object_info):
    import av

    from comfyui_server import error_text
    from skipdit_core import demo

    prompt = ui_to_api(load(DEMO), object_info)
    entry, log = server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", error_text(entry) + log[-3000:]
    real = "stand-in" if not demo.DEMO_MODEL.exists() else "bundled"
    assert f"Load Skip-DiT Model: {demo.DEMO_MODEL.name}: latte" in log and "pixels space" in log, log[-2000:]
    summary = re.search(r"Skip-Cache \[Latte, n=2, window t 900 -> 50, depth k=1\]: (\d+) full \+ (\d+) cached of 50 steps", log)
    assert summary and int(summary.group(2)) > 0, log[-2000:]
    (mp4,) = (base_dir / "output" / "skipdit").glob("demo-moving-shapes_*.mp4")
    with av.open(str(mp4)) as f:
        stream = f.streams.video[0]
        frames = list(f.decode(video=0))
        assert (len(frames), stream.width, stream.height, float(stream.average_rate)) == (8, 128, 128, 8.0), real


@needs_comfyui
@pytest.mark.parametrize("name", sorted(NAMES - NO_DOWNLOAD))
def test_download_workflows_are_valid_but_for_their_model_files(server, object_info, name):
    """Queued on a server without their weights, they are refused for the model files alone: every
    other value and link passed ComfyUI's validation."""
    wf = load(name)
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.queue(ui_to_api(wf, object_info))
    assert refused.value.code == 400
    body = json.loads(refused.value.read())
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    missing = {}
    for node in body["node_errors"].values():
        for error in node["errors"]:
            assert error["type"] in ("value_not_in_list", "custom_validation_failed"), error
            assert error["extra_info"]["input_name"] in MODEL_FILE_INPUTS, error
            (file,) = [f for f in model_files(wf) if f"'{f}'" in error["details"]]
            missing[file] = node["class_type"]
    assert missing == model_files(wf)


def browser_missing() -> str | None:
    """Why the frontend check cannot run here, or None."""
    tools = Path(os.environ.get("SKIPDIT_BROWSER_TOOLS", ROOT / "tests" / "browser"))
    chrome = os.environ.get("CHROME_PATH", "/usr/bin/chromium")
    if not shutil.which("node"):
        return "node (Node.js) is not installed"
    if not Path(chrome).exists():
        return f"no Chromium at {chrome} (set CHROME_PATH)"
    if not (tools / "node_modules" / "puppeteer-core").is_dir():
        return (f"puppeteer-core is not installed in {tools} (cd tests/browser && PUPPETEER_SKIP_DOWNLOAD=1 npm ci, "
                "or set SKIPDIT_BROWSER_TOOLS to an npm folder with it)")
    return None


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory) -> dict:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    server.post("/settings/Comfy.TutorialCompleted", True)  # no "get started" template dialog over the graph
    out = tmp_path_factory.mktemp("frontend")
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "comfyui_frontend_check.js"), server.url, str(out / "result.json"), str(out), *map(str, WORKFLOWS)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    shutil.copy(out / f"{DEMO}.png", SCREENSHOT)
    return {Path(r["file"]).stem: r for r in result["results"]} | {"_version": result["frontend"]}


@needs_comfyui
@pytest.mark.parametrize("name", sorted(NAMES))
def test_workflow_loads_in_the_frontend_without_missing_nodes(frontend, object_info, name):
    r = frontend[name]
    wf = load(name)
    assert r["unregistered"] == [] and r["missing"] == [], r
    # Frontend 1.58 marks a loader whose model file this server lacks with an error (a download to do, not
    # a missing node); only those may be marked, and the demo, whose model is bundled, has none.
    absent = sorted(t for f, t in model_files(wf).items() if f not in bundled_files())
    assert sorted(r["errored"]) in ([], absent), r["errored"]
    if name in NO_DOWNLOAD:
        assert r["errored"] == []
    assert not r["missingDialog"]
    assert (r["nodeCount"], r["linkCount"]) == (len(wf["nodes"]), len(wf["links"]))
    # The frontend's own API prompt is the converter's.
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    assert strip(r["apiPrompt"]) == strip(ui_to_api(wf, object_info))
    # Saved again by the frontend, every node is as in the file (but for the order it computes itself), its
    # sockets and widgets laid out by this server's schemas: the file's own on 0.33; on an older server the core
    # nodes changed since take the older layout, the frontend keeping the rest of the file (outputs, size).
    # Frontend 1.58 also writes widgets_values_named (the same values by widget name) and leaves out an
    # empty widgets_values: both are checked against the file, then set aside. It labels a nested dynamic-combo
    # socket ("format.codec") by its last part ("codec"): a display label, checked, then set aside.
    import make_workflows

    nodes, notes = make_workflows.WORKFLOWS[name]()
    built_here = build_workflow(nodes, object_info, notes)
    layout_here = {n["id"]: {"inputs": n["inputs"], "widgets_values": n["widgets_values"]} for n in built_here["nodes"]}
    file_nodes = {n["id"]: n for n in wf["nodes"]}
    for n in r["serialized"]["nodes"]:
        if "widgets_values_named" in n:
            assert list(n["widgets_values_named"].values()) == layout_here[n["id"]]["widgets_values"], n["type"]
        for socket in n.get("inputs", []):
            if "." in socket["name"] and socket["localized_name"] != socket["name"]:
                assert frontend_version(frontend) >= (1, 58) and socket["localized_name"] == socket["name"].rsplit(".", 1)[1], socket
                socket["localized_name"] = socket["name"]
    drop = lambda n: {k: v for k, v in n.items()  # noqa: E731
                      if k not in ("order", "widgets_values_named") and not (k == "widgets_values" and v == [])}
    saved = {n["id"]: drop(n) for n in r["serialized"]["nodes"]}
    assert saved == {i: drop({**n, **layout_here[i]}) for i, n in file_nodes.items()}
    assert r["serialized"]["links"] == wf["links"]


def frontend_version(result: dict) -> tuple[int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", result.get("_version") or result.get("frontend") or "0")[:2])


@pytest.fixture(scope="module")
def frontend_038_video(server, tmp_path_factory) -> dict:
    """The video workflows loaded in the frontend while its /object_info answer carries 0.38's CreateVideo
    and SaveVideo (this server is older: the nodes are drawn and serialised, not run)."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    server.post("/settings/Comfy.TutorialCompleted", True)
    out = tmp_path_factory.mktemp("frontend-0.38-video")
    files = [p for p in WORKFLOWS if '"SaveVideo"' in p.read_text()]
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "comfyui_frontend_check.js"), server.url, str(out / "result.json"), str(out), *map(str, files)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "SKIPDIT_OBJECT_INFO_PATCH": str(V038_VIDEO_FILE)},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    if frontend_version(result) < (1, 58):  # the server's own frontend (0.3.64: 1.27) draws no dynamic combo
        pytest.skip(f"frontend {result['frontend']} is older than 0.38's (1.58): set SKIPDIT_FRONTEND_ROOT to 1.58.1's static/")
    return {Path(r["file"]).stem: r for r in result["results"]}


@needs_comfyui
def test_video_workflows_under_0_38_video_schemas_convert_as_the_frontend_builds_them(frontend_038_video, object_info):
    """Against ComfyUI 0.38's schemas of the core video nodes: the frontend's API prompt of each shipped
    video workflow is the converter's, and so is that of the graph the frontend saves (its widgets_values
    laid out for the dynamic combos)."""
    schemas = object_info | V038_VIDEO
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    assert len(frontend_038_video) == 5
    for name, r in frontend_038_video.items():
        assert r["unregistered"] == [] and r["missing"] == [] and not r["missingDialog"], (name, r)
        ours = ui_to_api(load(name), schemas)
        assert strip(r["apiPrompt"]) == strip(ours), name
        assert strip(ui_to_api(r["serialized"], schemas)) == strip(ours), name
        save = next(v for v in ours.values() if v["class_type"] == "SaveVideo")["inputs"]
        assert {"format", "format.codec", "codec"} <= set(save), save


@needs_comfyui
def test_demo_screenshot_saved(frontend):
    assert SCREENSHOT.stat().st_size > 10_000
    assert frontend["_version"]


def test_a_file_saved_before_a_node_gained_optional_widgets_converts_with_their_defaults():
    """Sampler's optional noise_seed (+ its control) and flag are trailing optional widgets: a file
    with only the required values converts, the missing ones at their defaults (what the frontend
    gives a widget the file has no value for); one value short of the required ones is still an error."""
    wf = small_graph()
    sampler = next(n for n in wf["nodes"] if n["id"] == 4)
    sampler["widgets_values"] = sampler["widgets_values"][:4]  # seed, control, steps, name
    inputs = ui_to_api(wf, SCHEMAS)["4"]["inputs"]
    assert inputs == {"model": ["3", 0], "seed": 42, "steps": 7, "name": "y", "latent": ["2", 0], "noise_seed": 1, "flag": False}
    sampler["widgets_values"] = sampler["widgets_values"][:3]
    with pytest.raises(WorkflowError, match=r"3 widget values, none for the required widget 'name'"):
        ui_to_api(wf, SCHEMAS)


def test_a_file_saved_by_a_newer_version_converts_as_the_frontend_reads_it():
    """A file written for 0.33 (CreateVideo: fps, bit_depth) on a server whose CreateVideo has only fps: the
    frontend fills fps and drops the value of the widget this server lacks, and so does the converter. Without
    the file naming that widget, the extra value is still an error."""
    older = {"CreateVideo": {"input": {"required": {"images": ["IMAGE", {}], "fps": ["FLOAT", {"default": 30.0}]}},
                             "output": ["VIDEO"], "output_name": ["VIDEO"], "display_name": "Create Video"}}
    wf = build_workflow([Node(1, "Images", (0, 0)), Node(2, "CreateVideo", (300, 0), {"fps": 8.0}, {"images": (1, 0)})],
                        IMAGES | V033_CORE)
    create = next(n for n in wf["nodes"] if n["id"] == 2)
    assert create["widgets_values"] == [8.0, 8]
    assert ui_to_api(wf, IMAGES | older)["2"]["inputs"] == {"images": ["1", 0], "fps": 8.0}
    create["inputs"] = [i for i in create["inputs"] if i["name"] != "bit_depth"]
    with pytest.raises(WorkflowError, match=r"node 2 \(CreateVideo\): 2 widget values for 1 widgets \['fps'\]"):
        ui_to_api(wf, IMAGES | older)
