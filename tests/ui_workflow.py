"""UI-format (litegraph) workflow -> API prompt, the way ComfyUI's frontend does it (graphToPrompt).

- widgets_values are positional over the widget inputs of INPUT_TYPES (required, then optional):
  INT/FLOAT/STRING/BOOLEAN and COMBO lists, unless `forceInput`;
- a seed-like INT (named seed/noise_seed, or flagged control_after_generate) is followed by the
  unserialised `control_after_generate` value; an `image_upload` COMBO by the upload widget's value;
- a link overrides a widget of the same name; muted (2) and bypassed (4) nodes and virtual nodes
  (Note, Reroute, PrimitiveNode, MarkdownNote) are left out.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def widget_inputs(cls) -> list[tuple[str, int]]:
    """(input name, number of extra unserialised widget values after it)."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, s in (spec.get(section) or {}).items():
            typ = s[0]
            opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
            if opts.get("forceInput"):
                continue
            if isinstance(typ, (list, tuple)) or typ in WIDGET_TYPES:
                extra = 0
                if typ == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
                    extra = 1
                if opts.get("image_upload"):
                    extra = 1
                out.append((name, extra))
    return out


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n.get("mode", 0) in (2, 4) or n["type"] in VIRTUAL:
            continue
        if n["type"] not in node_classes:
            raise KeyError(f"node {n['id']}: type {n['type']!r} is not registered in the host")
        vals = list(n.get("widgets_values") or [])
        inputs: dict = {}
        i = 0
        for name, extra in widget_inputs(node_classes[n["type"]]):
            if i >= len(vals):
                raise ValueError(f"node {n['id']} ({n['type']}): widgets_values has {len(vals)} values, too few for '{name}'")
            inputs[name] = vals[i]
            i += 1 + extra
        if i != len(vals):
            raise ValueError(f"node {n['id']} ({n['type']}): {len(vals)} widgets_values but the widgets take {i}")
        for inp in n.get("inputs") or []:
            if inp.get("link") is not None:
                l = links[inp["link"]]
                inputs[inp["name"]] = [str(l[1]), l[2]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return prompt
