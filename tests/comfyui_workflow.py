"""ComfyUI workflow files for the tests: UI format (what people share and drag into ComfyUI: `nodes`,
`links`, `widgets_values`, version 0.4) -> API format (what `POST /prompt` runs), and the reverse
direction for writing workflows/*.json from a short description. Plain Python: the node schemas come
from a server's `GET /object_info` (a dict), never from importing ComfyUI.

How the frontend lays out a node's widgets (ComfyUI frontend 1.27; checked against its own
`app.graphToPrompt()` in tests/test_comfyui_workflows.py):
- the schema's inputs in `input_order` (required, then optional) that are widgets (INT, FLOAT, STRING,
  BOOLEAN, COMBO, not `forceInput`) give one entry of `widgets_values` each, in that order, also when
  the input is fed by a link (the link wins);
- an INT with `control_after_generate` (or, with the flag absent, named `seed` / `noise_seed`) is
  followed by one extra entry, the control mode ("fixed", "randomize", ...), which is no node input;
- every other input is a socket: a link or nothing.
- a dynamic combo (`COMFY_DYNAMICCOMBO_V3`, ComfyUI 0.38's V3 `io.DynamicCombo`, e.g. SaveVideo's
  `format`) is a combo of its options' keys whose chosen option adds that option's inputs (required,
  then optional), named `<combo>.<input>` and nested as deep as the options go, right after the
  combo's own widget (frontend 1.58's dynamicWidgets.ts); the API prompt holds them under those
  dotted names (0.38's `finalize_prefix`). So the layout of such a node depends on the values it holds.
Note / MarkdownNote nodes are frontend-only and dropped; Reroute nodes are followed; muted nodes
(mode 2) are dropped and bypassed nodes (mode 4) hand each output the first input of the same type.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
# Combos that list model files: a workflow names files the building server need not have.
MODEL_FILE_INPUTS = {"checkpoint", "ckpt_name", "clip_name", "vae_name", "lora_name", "unet_name", "branches"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


class WorkflowError(ValueError):
    pass


# ----------------------------------------------------------------------------- schemas


def input_kind(spec: list) -> str:
    """The type of one object_info input spec: a list of options is a COMBO."""
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else str(kind)


def input_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def schema_inputs(schema: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) of a node's inputs in the frontend's order (hidden inputs left out)."""
    out = []
    for section in ("required", "optional"):
        specs = schema.get("input", {}).get(section, {}) or {}
        order = (schema.get("input_order") or {}).get(section) or list(specs)
        out += [(name, specs[name], section == "required") for name in order if name in specs]
    return out


def is_widget(spec: list) -> bool:
    return input_kind(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput", False)


def has_control_widget(name: str, spec: list) -> bool:
    """Whether the frontend adds a "control after generate" widget after this input's widget."""
    options = input_options(spec)
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return input_kind(spec) == "INT" and name.rsplit(".", 1)[-1] in ("seed", "noise_seed")


def choices(spec: list) -> list:
    """The values a COMBO or dynamic combo accepts."""
    if input_kind(spec) == DYNAMIC_COMBO:
        return [option["key"] for option in input_options(spec).get("options", [])]
    return spec[0] if isinstance(spec[0], list) else input_options(spec).get("options", [])


def option_inputs(spec: list, key: Any) -> list[tuple[str, list, bool]]:
    """(name, spec, required) of the inputs a dynamic combo adds when `key` is chosen."""
    for option in input_options(spec).get("options", []):
        if option["key"] == key:
            inputs = option.get("inputs") or {}
            return [(name, sub, section == "required") for section in ("required", "optional")
                    for name, sub in (inputs.get(section) or {}).items()]
    raise WorkflowError(f"{key!r} is not one of {choices(spec)}")


def expand_inputs(schema: dict, choose: Callable[[str, list, bool], Any]) -> list[tuple[str, list, bool]]:
    """(name, spec, required) of every input of a node, dynamic combos expanded: `choose(name, spec,
    required)` is called on each widget input in layout order and returns its value, which for a dynamic
    combo selects the inputs that follow it. An input inside an optional one counts as optional."""
    out = []

    def visit(entries, prefix: str, parent_required: bool) -> None:
        for name, spec, required in entries:
            full, required = prefix + name, required and parent_required
            out.append((full, spec, required))
            if is_widget(spec):
                value = choose(full, spec, required)
                if input_kind(spec) == DYNAMIC_COMBO:
                    visit(option_inputs(spec, value), full + ".", required)

    visit(schema_inputs(schema), "", True)
    return out


def widget_layout(schema: dict) -> list[tuple[Optional[str], list]]:
    """One (input name, spec) per entry of `widgets_values` with every dynamic combo at its default;
    (None, spec) for a control widget."""
    layout = []

    def default(name, spec, required):
        layout.append((name, spec))
        if has_control_widget(name, spec):
            layout.append((None, spec))
        return _default(name, spec)

    expand_inputs(schema, default)
    return layout


def widget_values(node_id, kind: str, schema: dict, values, file_widgets: Sequence[str] = ()) -> tuple[dict, list]:
    """({input name: value}, inputs as expand_inputs gives them) of one node's `widgets_values`: a list in
    layout order (dynamic combos expanded by the values they hold) or a dict by widget name. A file saved
    before a node gained optional widgets lacks them: they take their defaults, as the frontend does.

    file_widgets: the widget names the file's node lists in its `inputs`. A file saved by a newer ComfyUI,
    whose node lists widgets this schema does not have, holds values beyond this schema's widgets: the
    frontend fills this schema's widgets in order and drops the rest, and so does this. Values beyond the
    widgets with no such widget in the file are an error."""
    named = isinstance(values, dict)
    out, taken, layout = {}, 0, []

    def take(name, spec, required):
        nonlocal taken
        layout.append(name)
        if named:
            found, value = name in values, values.get(name)
        else:
            found = taken < len(values)
            value = values[taken] if found else None
            taken += found
            if has_control_widget(name, spec):
                layout.append("(control)")
                taken += taken < len(values)
        if not found:
            if required:
                raise WorkflowError(f"node {node_id} ({kind}): {len(values)} widget values, none for the "
                                    f"required widget {name!r} of {layout}")
            value = _default(name, spec)
        if input_kind(spec) == DYNAMIC_COMBO and value not in choices(spec):
            raise WorkflowError(f"node {node_id} ({kind}): {name} is {value!r}, not one of {choices(spec)}")
        out[name] = value
        return value

    inputs = expand_inputs(schema, take)
    newer_file = [w for w in file_widgets if w not in layout]
    if not named and taken < len(values) and not newer_file:
        raise WorkflowError(f"node {node_id} ({kind}): {len(values)} widget values for {len(layout)} widgets {layout}")
    return out, inputs


# ----------------------------------------------------------------------------- UI -> API


def _links(workflow: dict) -> dict[int, tuple[int, int, int, int, str]]:
    """link id -> (origin node, origin slot, target node, target slot, type); arrays (0.4) or objects."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[int(link["id"])] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"])
        else:
            lid, a, a_slot, b, b_slot, kind = link[:6]
            out[int(lid)] = (a, a_slot, b, b_slot, kind)
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt of a UI-format workflow: {"<node id>": {"class_type", "inputs", "_meta"}}.

    Strict: an unknown node type, a widgets_values list that does not fit the node's schema, a link
    whose type differs from the input's, or a required socket left empty raise WorkflowError."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = _links(workflow)
    unknown = sorted({n["type"] for n in nodes.values() if n["type"] not in object_info
                      and n["type"] not in FRONTEND_ONLY and n["type"] != "Reroute"})
    if unknown:
        raise WorkflowError(f"node types unknown to this ComfyUI: {unknown}")

    def source(link_id: int, want: str, seen=()) -> Optional[list]:
        """[origin id, slot] feeding a link, through reroutes and bypassed nodes; None: nothing."""
        origin, slot, _, _, kind = links[int(link_id)]
        node = nodes[int(origin)]
        if int(origin) in seen:
            raise WorkflowError(f"a cycle through node {origin}")
        seen = seen + (int(origin),)
        if node["type"] == "Reroute":
            upstream = (node.get("inputs") or [{}])[0].get("link")
            return None if upstream is None else source(upstream, want, seen)
        mode = node.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            out_type = node["outputs"][slot]["type"]
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source(inp["link"], want, seen)
            return None
        return [str(origin), int(slot)]

    prompt = {}
    for node_id, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in FRONTEND_ONLY or kind == "Reroute" or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        schema = object_info[kind]
        linked = {inp["name"]: inp for inp in node.get("inputs") or [] if inp.get("link") is not None}
        # frontend 1.58 also writes widgets_values_named and leaves out an empty widgets_values
        values = node.get("widgets_values") or node.get("widgets_values_named") or []
        file_widgets = [inp["widget"]["name"] for inp in node.get("inputs") or [] if "widget" in inp]
        values_by_name, all_inputs = widget_values(node_id, kind, schema, values, file_widgets)
        inputs = {}
        for name, spec, required in all_inputs:
            if name in linked:
                inp = linked[name]
                origin_type = links[int(inp["link"])][4]
                want = input_kind(spec)
                if want not in ("*", "COMBO", DYNAMIC_COMBO) and origin_type != "*" and not set(str(origin_type).split(",")) & set(want.split(",")):
                    raise WorkflowError(f"node {node_id} ({kind}) input {name!r} is {want}, linked to {origin_type}")
                src = source(inp["link"], want)
                if src is not None:
                    inputs[name] = src
                    continue
            if name in values_by_name:
                inputs[name] = values_by_name[name]
            elif required:
                raise WorkflowError(f"node {node_id} ({kind}): required input {name!r} is not connected")
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title") or schema.get("display_name", kind)}}
    return prompt


# ----------------------------------------------------------------------------- building UI workflows


@dataclass
class Node:
    """One node of a workflow to build: widget values by input name (the others get the schema's
    default), links by input name as (node id, output slot)."""

    id: int
    type: str
    pos: tuple[float, float]
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    control: str = "fixed"  # the control-after-generate mode of seed-like widgets
    title: Optional[str] = None
    size: Optional[tuple[float, float]] = None
    color: Optional[str] = None
    bgcolor: Optional[str] = None


def _default(name: str, spec: list) -> Any:
    options = input_options(spec)
    if "default" in options:
        return options["default"]
    kind = input_kind(spec)
    if kind in ("COMBO", DYNAMIC_COMBO):
        if not choices(spec):
            raise WorkflowError(f"input {name!r} has no options and no value was given")
        return choices(spec)[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def note(id: int, pos: tuple[float, float], text: str, size=(420.0, 300.0), title: Optional[str] = None) -> dict:
    """A frontend Note node (a text box; no input, no output, never sent to the server)."""
    node = {"id": id, "type": "Note", "pos": list(pos), "size": list(size), "flags": {}, "order": 0, "mode": 0,
            "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
            "color": "#432", "bgcolor": "#653"}
    if title:
        node["title"] = title
    return node


def build_workflow(spec_nodes: list[Node], object_info: dict, notes: tuple[dict, ...] = ()) -> dict:
    """A UI-format workflow (version 0.4) of `spec_nodes` from the servers' node schemas. Checks that
    every widget value is a valid choice / in range and that every link joins matching types."""
    by_id = {n.id: n for n in spec_nodes}
    link_rows, node_rows = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for n in spec_nodes:
        schema = object_info[n.type]
        names = {name for name, _, _ in schema_inputs(schema)}
        for name, (src, slot) in n.links.items():
            if name not in names:
                raise WorkflowError(f"{n.type} has no input {name!r}")
            src_schema = object_info[by_id[src].type]
            kind = src_schema["output"][slot]
            want = input_kind(dict((a, b) for a, b, _ in schema_inputs(schema))[name])
            if want not in ("*", kind) and kind not in want.split(","):
                raise WorkflowError(f"{n.type}.{name} wants {want}, {by_id[src].type} output {slot} is {kind}")
            link_id = len(link_rows) + 1
            link_rows.append([link_id, src, slot, n.id, None, kind])  # target slot filled below
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(n.id, name)] = link_id
    # execution order: a node after all its sources
    order, placed = [], set()
    while len(order) < len(spec_nodes):
        ready = [n for n in spec_nodes if n.id not in placed and all(src in placed for src, _ in n.links.values())]
        if not ready:
            raise WorkflowError("the links form a cycle")
        for n in ready:
            order.append(n.id)
            placed.add(n.id)
    for n in spec_nodes:
        schema = object_info[n.type]
        # every input, a dynamic combo's own inputs (e.g. "format.codec") after it, by the chosen values
        expanded = expand_inputs(schema, lambda name, spec, _: n.widgets[name] if name in n.widgets else _default(name, spec))
        unknown = set(n.widgets) - {name for name, spec, _ in expanded if is_widget(spec)}
        if unknown:
            raise WorkflowError(f"{n.type} has no widgets {sorted(unknown)}")
        # The frontend's slots: the sockets first, then the widget inputs, each in schema order.
        sockets = [(name, spec, req) for name, spec, req in expanded if not is_widget(spec)]
        widgets = [(name, spec, req) for name, spec, req in expanded if is_widget(spec)]
        inputs, values = [], []
        for name, spec, required in sockets + widgets:
            link_id = in_links.get((n.id, name))
            entry = {"localized_name": name, "name": name}
            if not required:
                entry["shape"] = 7  # the frontend's hollow dot of an optional input
            entry["type"] = input_kind(spec)
            if is_widget(spec):
                value = n.widgets[name] if name in n.widgets else _default(name, spec)
                _check_value(n.type, name, spec, value)
                values.append(value)
                if has_control_widget(name, spec):
                    values.append(n.control)
                entry["widget"] = {"name": name}
            entry["link"] = link_id
            if link_id is not None:
                link_rows[link_id - 1][4] = len(inputs)
            inputs.append(entry)
        outputs = []
        for slot, (kind, name) in enumerate(zip(schema["output"], schema["output_name"])):
            outputs.append({"localized_name": name, "name": name, "type": kind, "links": out_links.get((n.id, slot), [])})
        row = {"id": n.id, "type": n.type, "pos": [float(n.pos[0]), float(n.pos[1])],
               "size": list(n.size) if n.size else _size(schema, inputs, outputs, values),
               "flags": {}, "order": order.index(n.id), "mode": MODE_ALWAYS, "inputs": inputs, "outputs": outputs,
               "properties": {"Node name for S&R": n.type}, "widgets_values": values}
        if n.title:
            row["title"] = n.title
        if n.color:
            row["color"], row["bgcolor"] = n.color, n.bgcolor
        node_rows.append(row)
    extra_nodes = [dict(x, order=len(spec_nodes) + i) for i, x in enumerate(notes)]
    all_nodes = node_rows + extra_nodes
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "skipdit-workflow:" + ",".join(f"{n.id}:{n.type}" for n in spec_nodes))),
        "revision": 0,
        "last_node_id": max(n["id"] for n in all_nodes),
        "last_link_id": len(link_rows),
        "nodes": all_nodes,
        "links": link_rows,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [40.0, 60.0]}},
        "version": 0.4,
    }


def _size(schema, inputs, outputs, values) -> list[float]:
    sockets = max(sum(1 for i in inputs if "widget" not in i), len(outputs))
    widgets = len(values)
    multiline = any(input_options(spec).get("multiline") for _, spec, _ in schema_inputs(schema) if input_kind(spec) == "STRING")
    return [320.0, 30.0 + 22.0 * sockets + 26.0 * widgets + (90.0 if multiline else 0.0)]


def _check_value(node_type: str, name: str, spec: list, value: Any) -> None:
    kind, options = input_kind(spec), input_options(spec)
    where = f"{node_type}.{name}"
    if kind in ("COMBO", DYNAMIC_COMBO):
        if name in MODEL_FILE_INPUTS:
            if not isinstance(value, str) or not value:
                raise WorkflowError(f"{where}: {value!r} is not a file name")
        elif value not in choices(spec):
            raise WorkflowError(f"{where}: {value!r} is not one of {choices(spec)[:8]}...")
    elif kind in ("INT", "FLOAT"):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (kind == "INT" and not isinstance(value, int)):
            raise WorkflowError(f"{where}: {value!r} is not an {kind}")
        if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
            raise WorkflowError(f"{where}: {value} is outside {options.get('min')}..{options.get('max')}")
    elif kind == "STRING" and not isinstance(value, str):
        raise WorkflowError(f"{where}: {value!r} is not a string")
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        raise WorkflowError(f"{where}: {value!r} is not a boolean")
