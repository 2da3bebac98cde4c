"""Layout-to-image: tau_theta turns a list of (class, bounding box) pairs into tokens.

As in the paper's layout model, each object becomes one token: the embedding of its class plus
embeddings of its four box coordinates, each quantised into ``num_bins`` bins; a transformer then
mixes the tokens. Layouts shorter than ``max_objects`` are padded with a "pad" class, and the
all-padding layout is the null input for classifier-free guidance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

from ..data.scenes import scene_classes
from ..utils.arguments import positive_int
from ..utils.model_cards import CardDetails, ComponentCardMixin
from . import widgets
from .base import Conditioning, ConditioningMode, Encoders, add_argument_once

Box = tuple[float, float, float, float]
Layout = Sequence[tuple[int, Box]]


def check_layouts(layouts: Sequence[Layout], num_classes: int, max_objects: int) -> list[list[tuple[int, Box]]]:
    """The layouts as lists of ``(class_id, (x0, y0, x1, y1))`` with int ids and float coordinates, or a
    ``TypeError`` / ``ValueError`` naming the bad entry and what is accepted."""
    checked = []
    for layout in layouts:
        if not isinstance(layout, (list, tuple)):
            raise TypeError(f"A layout is a list of (class_id, (x0, y0, x1, y1)); got {layout!r:.60}.")
        if len(layout) > max_objects:
            raise ValueError(f"A layout has {len(layout)} objects; this encoder takes at most {max_objects}.")
        objects = []
        for obj in layout:
            try:
                class_id, box = obj
                x0, y0, x1, y1 = (float(v) for v in box)
                if isinstance(class_id, bool) or int(class_id) != class_id:
                    raise TypeError("class ids are integers")
            except (TypeError, ValueError, OverflowError) as err:
                raise ValueError(f"Layout entries are (class_id, (x0, y0, x1, y1)) with an integer class id; "
                                 f"got {obj!r:.80}.") from err
            if not 0 <= int(class_id) < num_classes:
                raise ValueError(f"Unknown layout class id {class_id}: this model knows 0..{num_classes - 1}.")
            if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
                raise ValueError(f"Layout box {tuple(box)} must satisfy 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 "
                                 "(coordinates are fractions of the width and height, x0 <= x1 and y0 <= y1).")
            objects.append((int(class_id), (x0, y0, x1, y1)))
        checked.append(objects)
    return checked


class LayoutEncoder(ComponentCardMixin, ModelMixin, ConfigMixin):
    """Layouts -> tokens [B, max_objects, context_dim]. A layout is a list of ``(class_id, (x0, y0, x1, y1))``
    with coordinates in [0, 1] (x to the right, y down) and ``x0 <= x1``, ``y0 <= y1``."""

    has_null_layout = True  # the empty layout is the null input condition dropout trains it with

    @register_to_config
    def __init__(
        self,
        num_classes: int = 100,
        context_dim: int = 512,
        max_objects: int = 8,
        num_bins: int = 64,
        depth: int = 4,
        num_heads: int = 8,
    ):
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes + 1, context_dim)  # + the pad class
        self.coordinate_embeddings = nn.ModuleList([nn.Embedding(num_bins, context_dim) for _ in range(4)])
        self.slot_embedding = nn.Parameter(torch.zeros(max_objects, context_dim))
        layer = nn.TransformerEncoderLayer(
            context_dim, num_heads, 4 * context_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(context_dim)

    @property
    def pad_class(self) -> int:
        return self.config.num_classes

    def tokenize(self, layouts: Sequence[Layout]) -> tuple[torch.Tensor, torch.Tensor]:
        """(class ids [B, max_objects], coordinate bins [B, max_objects, 4]) with validation."""
        cfg = self.config
        classes = torch.full((len(layouts), cfg.max_objects), self.pad_class, dtype=torch.long)
        boxes = torch.zeros(len(layouts), cfg.max_objects, 4)
        for b, layout in enumerate(check_layouts(layouts, cfg.num_classes, cfg.max_objects)):
            for i, (class_id, box) in enumerate(layout):
                classes[b, i] = class_id
                boxes[b, i] = torch.tensor(box)
        bins = (boxes * (cfg.num_bins - 1)).round().long()
        return classes, bins

    def forward(self, layouts: Sequence[Layout]) -> torch.Tensor:
        classes, bins = self.tokenize(layouts)
        device = self.class_embedding.weight.device
        classes, bins = classes.to(device), bins.to(device)
        tokens = self.class_embedding(classes) + self.slot_embedding
        for k, table in enumerate(self.coordinate_embeddings):
            tokens = tokens + table(bins[..., k])
        return self.norm(self.transformer(tokens))

    def _card_details(self) -> CardDetails:
        """Description, tags, pipeline tag and table rows for this encoder's model card."""
        config = self.config
        return ((f"The layout encoder tau_theta: up to {config.max_objects} (class, box) pairs -> tokens "
                 f"[B, L, {config.context_dim}] for cross-attention."),
                ["conditioning", "layout-to-image"], None, [("object classes", config.num_classes)])


class LayoutBERTEncoder(ComponentCardMixin, ModelMixin, ConfigMixin):
    """The paper's layout-to-image tau_theta (CompVis layout2img-openimages256): a layout becomes a sequence of
    ``3 * max_objects + 2`` tokens over one vocabulary of ``vocab_size`` ids, as taming-transformers'
    objects/bounding-box builder writes it, and a BERT-like transformer (diffusers' ``LDMBertModel``, CompVis'
    BERTEmbedder) maps them to tokens [B, 3 * max_objects + 2, d_model] for cross-attention.

    Per object ``(class_id, corner(x0, y0), corner(x1, y1))`` with ``corner(x, y) = round(y * (g - 1)) * g +
    round(x * (g - 1))`` on a ``g = int(sqrt(vocab_size))`` grid (Python's round, half to even); unused slots are
    ``vocab_size - 1`` three times; then the crop's two corners, (0, 0) and (1, 1) for the whole image. Objects keep
    the caller's order (taming shuffles them while training). Layouts are as :class:`LayoutEncoder` takes them.
    The released model was trained without a null layout, so it has no classifier-free guidance."""

    has_null_layout = False

    @register_to_config
    def __init__(self, vocab_size: int = 8192, max_objects: int = 30, num_classes: int = 601, d_model: int = 1280,
                 num_layers: int = 32):

        super().__init__()
        if num_classes >= vocab_size:
            raise ValueError(f"num_classes={num_classes} must be below vocab_size={vocab_size}: class ids and "
                             "box corners share one vocabulary.")
        self.transformer = LDMBertModel(LDMBertConfig(
            vocab_size=vocab_size, d_model=d_model, encoder_layers=num_layers, encoder_ffn_dim=4 * d_model,
            encoder_attention_heads=8, head_dim=64, max_position_embeddings=3 * max_objects + 2, dropout=0.0))

    def corner(self, x: float, y: float) -> int:
        grid = int(self.config.vocab_size ** 0.5)
        return round(y * (grid - 1)) * grid + round(x * (grid - 1))

    def tokenize(self, layouts: Sequence[Layout]) -> torch.Tensor:
        """Token ids [B, 3 * max_objects + 2], with validation."""
        cfg = self.config
        empty = [cfg.vocab_size - 1] * 3
        rows = []
        for layout in check_layouts(layouts, cfg.num_classes, cfg.max_objects):
            row = [t for class_id, (x0, y0, x1, y1) in layout for t in (class_id, self.corner(x0, y0), self.corner(x1, y1))]
            rows.append(row + empty * (cfg.max_objects - len(layout)) + [self.corner(0, 0), self.corner(1, 1)])
        return torch.tensor(rows, dtype=torch.long)

    def window_tokens(self, ids: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
        """``ids`` [B, n] with the crop tokens (the last two) set to ``box`` (x, y, width, height in [0, 1]): where
        a window of tiled sampling lies in the whole image, as CompVis' split sampling re-tokenises them."""
        x, y, w, h = box
        crop = torch.tensor([self.corner(x, y), self.corner(x + w, y + h)], dtype=ids.dtype, device=ids.device)
        return torch.cat([ids[:, :-2], crop.expand(ids.shape[0], 2)], dim=1)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, n] -> context [B, n, d_model]."""
        return self.transformer(ids.to(self.transformer.device), return_dict=False)[0]

    def forward(self, layouts: Sequence[Layout]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(layouts))

    def _card_details(self) -> CardDetails:
        """Description, tags, pipeline tag and table rows for this encoder's model card."""
        c = self.config
        return (f"The layout encoder tau_theta: up to {c.max_objects} (class, box) pairs -> {3 * c.max_objects + 2} "
                f"tokens over {c.vocab_size} ids -> a {c.num_layers}-layer transformer -> [B, L, {c.d_model}] for "
                "cross-attention.", ["conditioning", "layout-to-image"], None,
                [("object classes", c.num_classes), ("vocabulary", c.vocab_size)])


def as_layout_batch(layout) -> list:
    """Accept one layout (a list of (class, box)) or a batch of them."""
    if len(layout) and isinstance(layout[0], (tuple, list)) and len(layout[0]) == 2 and not isinstance(layout[0][0], (tuple, list)):
        return [layout]
    return list(layout)


class LayoutMode(ConditioningMode):
    """``layout``: a list of (class_id, (x0, y0, x1, y1)) per image -> the layout encoder's tokens."""

    name = "layout"
    inputs = ("layout",)
    components = ("layout_encoder",)
    trains_null = True
    title = "layout-to-image"
    conditioned_on = "layouts"
    pipeline_tag = "text-to-image"
    usage = "image = pipe(layout=[(0, (0.1, 0.1, 0.6, 0.7))]).images[0]"
    default_dataset = "emoji-scenes"
    compvis_cond_stage_key = "coordinates_bbox"
    same_context_per_window = False  # the boxes are placed in the whole image: each window needs its own crop tokens

    def can_guide(self, pipe):
        return pipe.layout_encoder.has_null_layout

    def batch_size(self, values):
        return len(as_layout_batch(values["layout"]))

    def check_inputs(self, pipe, values):
        """One layout or a non-empty batch of them; every box inside [0, 1] and not inverted, every class id
        known to the layout encoder, at most ``max_objects`` objects (the encoder's own checks, run up front)."""
        layout = values["layout"]
        if not isinstance(layout, (list, tuple)):
            raise TypeError(f"layout must be a list of (class_id, (x0, y0, x1, y1)) pairs, or a list of such lists "
                            f"(a batch); got {layout!r:.60} ({type(layout).__name__}).")
        if not layout:
            raise ValueError("layout is an empty list: pass a list of (class_id, (x0, y0, x1, y1)) pairs, or a batch "
                             "of them ([[]] is one empty layout).")
        pipe.layout_encoder.tokenize(as_layout_batch(layout))

    def condition(self, pipe, values, latent_size):
        encoder, layouts = pipe.layout_encoder, as_layout_batch(values["layout"])
        if not hasattr(encoder, "window_tokens"):  # the package's own encoder: boxes as embeddings, no crop tokens
            return Conditioning(context=encoder(layouts))
        ids = encoder.tokenize(layouts)
        return Conditioning(context=encoder.encode_ids(ids), tokens=ids)

    def window_context(self, pipe, cond, box):
        """CompVis' layout model: the layout's tokens with the window's crop tokens, encoded again."""
        if cond.tokens is None:
            raise NotImplementedError(f"Tiled sampling needs crop tokens, which {type(pipe.layout_encoder).__name__} "
                                      "does not have (CompVis' LayoutBERTEncoder has them); sample at the trained size.")
        return pipe.layout_encoder.encode_ids(pipe.layout_encoder.window_tokens(cond.tokens, box))

    def null_values(self, pipe, values):
        """Empty layouts, where the encoder was trained with them as the null input (not CompVis' layout model)."""
        if not pipe.layout_encoder.has_null_layout:
            return None
        return {"layout": [[] for _ in as_layout_batch(values["layout"])]}

    def dataset_columns(self, columns):
        return {columns.layout_column: "layout"}

    def training_inputs(self, batch, columns, rngs=None):
        """Dataset layouts, as rows ``[class, x0, y0, x1, y1]`` or pairs ``(class, (x0, y0, x1, y1))``."""

        def as_pairs(layout):
            layout = layout.tolist() if isinstance(layout, torch.Tensor) else layout
            return [(int(o[0]), tuple(float(v) for v in (o[1:5] if len(o) == 5 else o[1]))) for o in layout]

        return {"layout": [as_pairs(layout) for layout in batch["layout"]]}

    # -- training -----------------------------------------------------------------------------------
    def add_training_arguments(self, group):
        add_argument_once(group, "--num_classes", type=positive_int, default=None,
                          help="Class / layout mode: the class count (default: from the dataset).")
        group.add_argument("--max_objects", type=positive_int, default=8, help="Layout mode: objects per layout.")
        group.add_argument("--layout_encoder_layers", type=positive_int, default=2)
        group.add_argument("--layout_column", default="layout", help="Layout mode: the dataset's layout column.")

    def check_training_args(self, parser, args):
        if args.context_dim % max(1, args.context_dim // 64):
            parser.error(f"--context_dim {args.context_dim}: the layout encoder uses context_dim // 64 = "
                         f"{args.context_dim // 64} attention heads, which must divide it (e.g. 64, 128, 256).")

    def build_encoders(self, args, train_ds, vae):
        classes = args.num_classes or (len(scene_classes(args.resolution)) if args.dataset_name == "emoji-scenes" else None)
        if classes is None:
            raise SystemExit("Pass --num_classes (the object classes of your layouts).")
        encoder = LayoutEncoder(num_classes=classes, context_dim=args.context_dim, max_objects=args.max_objects,
                                depth=args.layout_encoder_layers, num_heads=max(1, args.context_dim // 64))
        return Encoders(trainable={"layout_encoder": encoder}, context_dim=args.context_dim)

    # -- generate and the demo ----------------------------------------------------------------------
    def add_generate_arguments(self, parser):
        parser.add_argument("--layout", default=None,
                            help="For a layout-to-image model: a JSON file with a list of [class_id, [x0, y0, x1, y1]] "
                                 "(coordinates in [0, 1], x right, y down), e.g. [[5, [0.1, 0.2, 0.55, 0.7]]], or a list "
                                 "of such lists (one image each).")

    def generate_inputs(self, args):
        if args.layout is None:
            return None
        path = Path(args.layout)
        if not path.is_file():
            raise ValueError(f"--layout {args.layout}: no such file.")
        try:
            return {"layout": json.loads(path.read_text())}
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"--layout {args.layout}: not a JSON file ({err}).") from None

    def command_words(self, inputs, folder):
        (Path(folder) / "layout.json").write_text(json.dumps(inputs["layout"]))
        return ["--layout", "layout.json"]

    def demo_inputs(self, gr, pipe):
        size = widgets.default_size(pipe)
        n = pipe.layout_encoder.config.num_classes
        free = min(pipe.layout_encoder.config.max_objects, 8) - 1  # empty rows to fill in
        rows = [[0, 0.1, 0.1, 0.6, 0.7]] + [[None] * 5 for _ in range(free)]
        table = gr.Dataframe(value=rows, headers=widgets.LAYOUT_COLUMNS, datatype="number", type="array",
                             column_count=5, elem_id="layout-table",
                             label=f"Layout: one box per row, class 0..{n - 1}, corners in [0, 1] (x right, y down)")
        scale = max(1, 256 // size[1])
        preview = gr.Image(widgets.layout_preview(rows, size, n, scale), label="Layout preview", interactive=False,
                           format="png", elem_id="layout-preview")
        table.change(lambda value: widgets.layout_preview(value, size, n, scale), table, preview, queue=False)
        return [table], widgets.layout_inputs

    def shown_inputs(self, inputs):
        return {"layout": json.dumps(inputs["layout"])}
