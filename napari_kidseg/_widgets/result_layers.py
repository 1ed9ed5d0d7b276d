"""The dock's layers in the napari viewer, without Qt: the CT taken from its layer, the result
layers set or replaced, the reference labels, the 3D surfaces, and the slice in view.

Functions of the viewer (and the case's CT Volume); what a click on a layer does is handed in.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import KidsegError
from ..layers import LABEL_COLORS, LABEL_FEATURES, ORGAN_COLORS, ORGAN_FEATURES, REFERENCE_COLORS, SOURCE_KEY

LAYER_NAMES = {
    "coarse": "coarse labels",
    "refined": "refined labels",
    "fused": "fused labels (editable)",
    "rois": "kidney ROIs (refine patches)",
    "disagreement": "coarse/refined disagreement",
    "removed": "removed by anatomy check",
    "organs": "organs (context)",
    "preview": "preview (not applied yet)",
}
SURFACE_NAMES = {1: "3D kidney", 2: "3D tumor", 3: "3D cyst"}


def ct_from_layer(viewer, name: str):
    """The CT Volume of the image layer ``name`` (the one it was read into, or one made from the
    layer's scale); a clear error when it is no 3D grayscale CT."""
    from ..io.volumes import check_ct_intensities, volume_in_memory

    if not name:
        raise KidsegError("no 3D image layer to segment: open a CT first (File > Open, or the sample)")
    layer = viewer.layers[name]
    data = np.asarray(layer.data)
    if data.ndim != 3 or layer.rgb:
        raise KidsegError(f"layer {name!r} is not a 3D grayscale CT")
    check_ct_intensities(data, f"layer {name!r}")
    source = layer.metadata.get(SOURCE_KEY)
    if source is not None and source.array.shape == data.shape:
        source.array = data
        return source
    return volume_in_memory(data, tuple(layer.scale), tuple(layer.translate))


def set_labels_layer(viewer, ct, key, data, **kwargs):
    """The result layer ``key`` (see LAYER_NAMES) showing ``data`` on the CT's grid: its data
    replaced when it exists (napari keeps its canvas node), else added."""
    from ..io.volumes import Volume

    name = LAYER_NAMES[key]
    meta = {SOURCE_KEY: Volume(array=data, geometry=ct.geometry, source=ct.source)}
    if name in viewer.layers:
        layer = viewer.layers[name]
        place_layer(layer, ct.geometry.spacing, ct.geometry.origin_zyx)
        layer.data = data
        layer.metadata.update(meta)
        return layer
    layer = viewer.add_labels(data, name=name, metadata=meta, **ct.napari_kwargs(), **kwargs)
    layer.features = dict(LABEL_FEATURES)  # napari's status bar names the label under the cursor
    return layer


PREVIEW_COLORS = {None: "transparent", 0: "transparent", 1: "#ff8c00", 2: "#ff2020"}  # outlines


def preview_layer(viewer, ct, data):
    """The preview layer (a tool's change, outlined) showing ``data``, hidden until the caller
    shows it; the fused layer stays the selected one (a new layer would take the selection)."""
    layer = set_labels_layer(viewer, ct, "preview", data, opacity=1.0, visible=False, colormap=PREVIEW_COLORS)
    if layer.contour != 1:
        layer.contour = 1
    if LAYER_NAMES["fused"] in viewer.layers:
        viewer.layers.selection.active = viewer.layers[LAYER_NAMES["fused"]]
    return layer


def place_layer(layer, scale, translate):
    """A layer put on a grid (its data is set next): nothing when it is there already; else both
    in one transform update, one event (each of napari's setters re-slices the layer and moves its
    canvas node: 15-30 ms a call under load, for eight layers on every Next)."""
    same_scale, same_translate = np.allclose(layer.scale, scale), np.allclose(layer.translate, translate)
    if same_scale and same_translate:
        return
    try:
        transform = unproxied(layer)._transforms["data2physical"]
        clear_extent = unproxied(layer)._clear_extent
    except (AttributeError, KeyError, TypeError):  # another napari: its public setters
        layer.scale, layer.translate = scale, translate
        return
    transform.scale, transform.translate = np.array(scale, float), np.array(translate, float)
    clear_extent()
    # napari connects the same callbacks (the canvas node's matrix, the viewer's dims) to both events
    layer.events.translate()


def unproxied(obj):
    """napari hands a plugin's dock its viewer (and layers) behind a proxy that warns on private
    names; the two private calls below are made on the object itself."""
    return getattr(obj, "__wrapped__", obj)


@contextlib.contextmanager
def one_dims_update(viewer):
    """Layers' data, scale and translate set inside this block make the viewer recompute its dims
    (every layer's extent) once, at the end, instead of on every setter of every layer: swapping
    a case's eight layers cost 24 recomputations, 0.5-0.7 s of the GUI thread under load. (A
    napari without the viewer's ``_on_layers_change``: each setter recomputes, as without this.)"""
    viewer = unproxied(viewer)
    recompute = getattr(viewer, "_on_layers_change", None)
    if recompute is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        for layer in viewer.layers:
            for name in ("data", "scale", "translate"):
                stack.enter_context(getattr(layer.events, name).blocker(recompute))
        yield
    recompute()


def run_in_one_update(viewer, steps):
    """The layer steps run in one :func:`one_dims_update`."""
    with one_dims_update(viewer):
        for step in steps:
            step()


def swap_steps(viewer, keyed_steps) -> list | None:
    """The ``(key, step)`` pairs of :func:`result_layer_steps` as one event-loop turn when every
    layer is there already (a re-run, a worklist's next case; else None): only their data
    changes, with one dims update. Measured on Next (load 6 on 2 cores): 1.2 s to the case on
    screen, longest event-loop gap 0.7-0.8 s; the hidden layers in one turn and each shown one
    in its own took 1.7-2.1 s with a longest gap of 1.0-1.2 s (a redraw after every turn)."""
    if not all(LAYER_NAMES[key] in viewer.layers for key, _ in keyed_steps):
        return None
    return [lambda: run_in_one_update(viewer, [step for _, step in keyed_steps])]


def result_layer_steps(viewer, ct, s, comparison, restore_on_click, on_fused) -> list:
    """One ``(key, callable)`` per result layer, the fused one (editable) and above it the hidden
    preview last. ``restore_on_click(layer, event)`` is the removed layer's mouse callback;
    ``on_fused(layer)`` gets the fused layer."""
    colors = dict(LABEL_COLORS)

    def put(key, data, **kwargs):
        return set_labels_layer(viewer, ct, key, data, **kwargs)

    def rois():
        layer = put(
            "rois",
            comparison["rois"],
            opacity=0.8,
            visible=False,
            colormap={None: "transparent", 0: "transparent", 1: "cyan", 2: "orange"},
        )
        if layer.contour != 2:  # each set draws the outlines again
            layer.contour = 2

    def removed():
        layer = put("removed", comparison["removed"], opacity=0.9, colormap=colors)
        if layer.contour != 1:
            layer.contour = 1
        if restore_on_click not in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.append(restore_on_click)

    def organs():  # an organ-aware cascade's neighbours, as context: hidden until asked for
        layer = put("organs", s.result.organs, opacity=0.35, visible=False, colormap=dict(ORGAN_COLORS))
        layer.features = dict(ORGAN_FEATURES)

    def preview():
        # hidden and empty, built with the run's layers: a tool's first preview then only fills it
        # (a new labels layer is 0.3-0.6 s of the GUI thread); on a swap it takes the new case's
        # grid (on the old one the hidden layer would keep the slice slider at the old length)
        preview_layer(viewer, ct, np.zeros(s.labels.shape, np.uint8)).visible = False

    def fused():
        layer = put("fused", s.labels, opacity=0.6, colormap=colors)
        on_fused(layer)
        # the layer must edit the session's array itself, so that edits are seen by the session
        if layer.data is not s.labels:
            s.labels = layer.data

    return [
        ("coarse", lambda: put("coarse", comparison["coarse"], opacity=0.5, visible=False, colormap=colors)),
        ("refined", lambda: put("refined", comparison["refined"], opacity=0.5, visible=False, colormap=colors)),
        (
            "disagreement",
            lambda: put(
                "disagreement",
                comparison["disagreement"],
                opacity=0.7,
                visible=False,
                colormap={None: "transparent", 0: "transparent", 1: "magenta"},
            ),
        ),
        ("rois", rois),
        ("removed", removed),
        *([("organs", organs)] if s.result.organs is not None else []),
        ("fused", fused),
        ("preview", preview),  # above the fused layer, so its outlines show
    ]


def built_layers(layer_data) -> list:
    """napari layers made from ``(data, kwargs, kind)`` tuples, in a worker: making one costs
    25-900 ms (the first of a kind in a process imports napari's code for it, an image computes
    its contrast range), so only adding them is left to the GUI thread. No Qt is touched."""
    from napari.layers import Layer

    return [Layer.create(data, kwargs, kind) for data, kwargs, kind in layer_data]


def one_per_turn(steps, then=None, closed=lambda: False, failed=None):
    """Each step in an event-loop turn of its own (napari redraws between, so no turn holds the
    GUI thread for all of them), then ``then()``; nothing more once ``closed()``. A step that
    raises ends it: ``failed(exc)`` (which must free whatever waits for ``then``)."""
    from qtpy.QtCore import QTimer

    todo = list(steps)

    def step():
        if closed():
            return
        try:
            if not todo:
                if then is not None:
                    then()
                return
            todo.pop(0)()
        except Exception as exc:  # noqa: BLE001 - e.g. the viewer changed under us: said, and nothing stays busy
            if failed is None:
                raise
            failed(exc)
            return
        QTimer.singleShot(0, step)

    step()


def add_one_per_turn(viewer, layers, then, closed=lambda: False, failed=None, first=()):
    """Each layer added in a turn of its own (napari builds its canvas node and draws it: 0.2-0.4 s
    each under Xvfb), then ``then()``; the steps ``first`` (such as :func:`removal_steps`) before."""
    one_per_turn([*first, *(lambda ly=ly: viewer.add_layer(ly) for ly in layers)], then, closed, failed)


def update_comparison(viewer, comparison):
    """The comparison layers shown follow a new fusion."""
    for key in ("coarse", "refined", "disagreement", "removed"):
        if LAYER_NAMES[key] in viewer.layers:
            viewer.layers[LAYER_NAMES[key]].data = comparison[key]


def reference_layer(viewer, shape):
    """The reference labels layer (any labels layer that is not ours), and a line when one is on
    another grid and cannot be scored. A reference gets its own colours, as outlines."""
    from napari.layers import Labels

    ours = set(LAYER_NAMES.values())
    problem = None
    for layer in viewer.layers:
        if not isinstance(layer, Labels) or layer.name in ours:
            continue
        if layer.data.shape != shape:
            problem = (
                f"reference {layer.name!r} is on another grid ({'x'.join(map(str, layer.data.shape))} "
                f"voxels, not {'x'.join(map(str, shape))}): not scored"
            )
            continue
        if not layer.metadata.get("kidseg_reference_colours"):
            layer.metadata["kidseg_reference_colours"] = True
            layer.colormap = dict(REFERENCE_COLORS)
            layer.contour = 1
        return layer, None
    return None, problem


def remove_layers(viewer, layers):
    """Remove the layers in one batch: napari cleans its scene graph (a full garbage collection)
    once per batch, not once per layer."""
    with viewer.layers.batched_update():
        for ly in layers:
            if ly in viewer.layers:
                viewer.layers.remove(ly)


# layers removed in one event-loop turn when a case is closed: each costs napari some 25 ms (its
# events disconnected one by one) and each batch one full garbage collection (about 70 ms). The
# longest gap of bench_widget's "made the case", three invocations each: the ten layers in one
# batch 460-832 ms, 3 a turn 242-399, 2 a turn 253-272, 1 a turn 202-237 (6 replacements in a
# row, 3D on and off between, ran without a fault; session 12 saw napari crash once removing
# them one per turn, before they were hidden first: not seen since, its cause not known)
REMOVED_PER_TURN = 1


def removal_steps(viewer, layers, per_turn=REMOVED_PER_TURN) -> list:
    """Steps for :func:`one_per_turn` that remove ``layers``, ``per_turn`` a turn. They are hidden at
    once, so a case being closed is not seen while it goes."""
    layers = list(layers)
    for ly in layers:
        ly.visible = False
    chunks = [layers[i : i + per_turn] for i in range(0, len(layers), per_turn)]
    return [lambda chunk=chunk: remove_layers(viewer, chunk) for chunk in chunks]


def current_slice(viewer) -> int:
    return int(viewer.dims.current_step[0])


def show_slice(viewer, z: int):
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)


def focus_on(viewer, ct, z, y, x):
    """The slice z in view, centred on voxel (y, x)."""
    show_slice(viewer, z)
    sp, origin = ct.geometry.spacing, ct.geometry.origin_zyx
    viewer.camera.center = (origin[1] + y * sp[1], origin[2] + x * sp[2])


def single_colour(colour: str):
    from napari.utils.colormaps import Colormap
    from vispy.color import Color

    rgba = Color(colour).rgba
    return Colormap([rgba, rgba], name=f"kidseg {colour}")


def surface_layers(labels, spacing, origin_zyx, shown=()) -> dict:
    """In a worker: each label's surface (:func:`napari_kidseg.layers.label_surfaces`) and the
    napari layer that shows it, made here because the first surface layer of a process costs the
    GUI thread some 200 ms to make (napari's surface code imported, normals computed). A layer
    named in ``shown`` is in the viewer already (it takes the data): None, none made."""
    from ..layers import label_surfaces

    out = {}
    for value, data in label_surfaces(labels, spacing, origin_zyx).items():
        if value in SURFACE_NAMES:
            out[value] = (data, None if SURFACE_NAMES[value] in shown else _surface_layer(value, data))
    return out


def _surface_layer(value, data):
    from napari.layers import Surface

    colour = single_colour(LABEL_COLORS[value])
    return Surface(data, name=SURFACE_NAMES[value], colormap=colour, opacity=0.8)


def show_surfaces_steps(viewer, surfaces: dict, ct_name: str, hidden: dict) -> list:
    """The 3D view, as steps for :func:`one_per_turn`: the CT and every labels layer hidden
    (``hidden`` records them, for :func:`hide_surfaces_steps`) and the view made 3D, then each
    label surface (label value -> (surface data, its layer), :func:`surface_layers`) shown in a
    step of its own: the data swapped into a surface layer already there, else the layer added."""

    def to_3d():
        from napari.layers import Labels

        for ly in viewer.layers:
            if (isinstance(ly, Labels) or ly.name == ct_name) and ly.visible:
                hidden[ly.name] = True
                ly.visible = False
        viewer.dims.ndisplay = 3  # with every volume hidden (nothing to upload); the surfaces are 3D only

    def show(value, name):
        layers = viewer.layers
        if value not in surfaces:
            if name in layers:
                layers[name].visible = False
        elif name in layers:
            layers[name].data = surfaces[value][0]
            layers[name].visible = True
        else:  # made in the worker, or here when it was in the viewer then and has been deleted since
            data, layer = surfaces[value]
            viewer.add_layer(layer if layer is not None else _surface_layer(value, data))

    return [to_3d, *(lambda v=value, n=name: show(v, n) for value, name in SURFACE_NAMES.items())]


def hide_surfaces_steps(viewer, hidden: dict) -> list:
    """Back to 2D, as steps for :func:`one_per_turn`: the surfaces hidden and the view made 2D,
    then each layer the 3D view hid shown again in a step of its own (each is sliced and drawn)."""

    def to_2d():
        for name in SURFACE_NAMES.values():
            if name in viewer.layers:
                viewer.layers[name].visible = False
        # 2D first: a layer shown again while the view is still 3D is sliced and uploaded whole (the
        # CT and the labels as 3D textures: 2 s of the GUI thread under load), then again in 2D
        viewer.dims.ndisplay = 2

    def show_again(name, visible):
        hidden.pop(name, None)
        if name in viewer.layers:
            viewer.layers[name].visible = visible

    return [to_2d, *(lambda n=name, v=visible: show_again(n, v) for name, visible in hidden.items())]
