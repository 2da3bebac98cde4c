"""Class-conditional LDMs: tau_theta is an embedding table, one token per image for cross-attention."""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..utils.arguments import class_label, non_negative_int, positive_int
from ..utils.model_cards import CardDetails, ComponentCardMixin
from . import widgets
from .base import Conditioning, ConditioningMode, Encoders, add_argument_once, is_int, shown


class ClassEmbedder(ComponentCardMixin, ModelMixin, ConfigMixin):
    """Labels [B] in 0..num_classes-1 -> tokens [B, 1, context_dim]. Row ``num_classes`` is the learned
    "null" class used for classifier-free guidance (and for label dropout during training)."""

    @register_to_config
    def __init__(self, num_classes: int = 1000, context_dim: int = 512, has_null_class: bool = True,
                 class_names: list[str] | None = None):
        super().__init__()
        if class_names is not None and (len(class_names) != num_classes or len(set(class_names)) != num_classes):
            raise ValueError(f"class_names must hold {num_classes} distinct names (one per class), got "
                             f"{len(class_names)} ({len(set(class_names))} distinct).")
        # has_null_class=False: a model trained without label dropout (CompVis cin256), which cannot guide
        self.embedding = nn.Embedding(num_classes + int(has_null_class), context_dim)

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes if self.config.has_null_class else None

    def class_id(self, label: int | str) -> int:
        """The id of ``label``: an id as it is, a name (case-insensitive) looked up in ``class_names``."""
        if not isinstance(label, str):
            return int(label)
        names = self.config.class_names or []
        ids = {name.casefold(): i for i, name in enumerate(names)}
        if label.casefold() not in ids:
            known = f"its classes: {', '.join(repr(n) for n in names)}" if names else "it stores no class names"
            raise ValueError(f"Unknown class name {label!r} in class_labels: this model knows ids "
                             f"0..{self.config.num_classes - 1}; {known}.")
        return ids[label.casefold()]

    def class_name(self, class_id: int) -> str:
        """The stored name of ``class_id`` (``"class N"`` where the model stores none)."""
        names = self.config.class_names
        return names[class_id] if names else f"class {class_id}"

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=self.embedding.weight.device).long().reshape(-1)
        bad = labels[(labels < 0) | (labels >= self.embedding.num_embeddings)]
        if bad.numel():
            raise ValueError(
                f"Unknown class id(s) {sorted(set(bad.tolist()))}: this model knows 0..{self.config.num_classes - 1}"
                + (f" (and {self.config.num_classes} = the null class)." if self.config.has_null_class else ".")
            )
        return self.embedding(labels)[:, None, :]

    def null(self, batch_size: int) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("This class embedder has no null class (trained without label dropout): classifier-free "
                             "guidance and condition dropout need one; sample with guidance_scale=1.")
        return self(torch.full((batch_size,), self.null_class, dtype=torch.long))

    def _card_details(self) -> CardDetails:
        """Description, tags, pipeline tag and table rows for this encoder's model card."""
        config = self.config
        return ((f"The class-label encoder tau_theta: labels [B] in 0..{config.num_classes - 1} -> tokens "
                 f"[B, 1, {config.context_dim}] for cross-attention"
                 + (f" (row {config.num_classes} is the null class)." if config.has_null_class else " (no null class).")),
                ["conditioning", "class-conditional"], None,
                [("classes", config.num_classes)]
                + ([("class names", ", ".join(config.class_names))] if config.class_names else []))


class ClassMode(ConditioningMode):
    """``class_labels`` (int, list or tensor [B]) -> one token each; null: the learned null class."""

    name = "class"
    inputs = ("class_labels",)
    components = ("class_embedder",)
    trains_null = True
    title = "class-conditional"
    conditioned_on = "class labels"
    pipeline_tag = "unconditional-image-generation"
    usage = "image = pipe(class_labels=[0], guidance_scale=3.0).images[0]"
    noise_schedule = "class"
    compvis_cond_stage_key = "class_label"

    def can_guide(self, pipe):
        return pipe.class_embedder.null_class is not None

    @staticmethod
    def _listed(labels) -> list:
        """``class_labels`` as a list of ids and names (a name or an int alone is a list of one)."""
        if isinstance(labels, (str, int)) or is_int(labels):
            return [labels]
        if isinstance(labels, (list, tuple)):
            return list(labels)
        return torch.as_tensor(labels).reshape(-1).tolist()

    def _labels(self, pipe, values) -> torch.Tensor:
        """[B] class ids, names looked up in the class embedder's ``class_names``."""
        return torch.tensor([pipe.class_embedder.class_id(v) for v in self._listed(values["class_labels"])])

    def batch_size(self, values):
        return len(self._listed(values["class_labels"]))

    def check_inputs(self, pipe, values):
        """Class ids or names (an int or a name, a list of them, or an integer tensor/array of at most one
        dimension), at least one, each in 0..num_classes - 1 of the class embedder's config (or num_classes, the
        null class) or one of its ``class_names``."""
        labels = values["class_labels"]
        embedder = pipe.class_embedder
        num_classes = embedder.config.num_classes
        named = f" or class names ({', '.join(embedder.config.class_names)})" if embedder.config.class_names else ""
        accepted = (f"an int, a name, a list of them or a 1-d integer tensor of class ids in 0..{num_classes - 1} "
                    f"(or {num_classes}, the null class){named}")
        if isinstance(labels, torch.Tensor) or (hasattr(labels, "dtype") and hasattr(labels, "shape")):
            try:
                tensor = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"class_labels must be {accepted}, got {shown(labels)}.") from err
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise TypeError(f"class_labels must be {accepted}, got a {tensor.dtype} tensor.")
            if tensor.ndim > 1:
                raise ValueError(f"class_labels must be {accepted}, got shape {tuple(tensor.shape)}.")
        elif not (is_int(labels) or isinstance(labels, str) or (
                isinstance(labels, (list, tuple)) and all(is_int(v) or isinstance(v, str) for v in labels))):
            raise TypeError(f"class_labels must be {accepted}, got {shown(labels)}.")
        ids = [embedder.class_id(v) for v in self._listed(labels)]
        if not ids:
            raise ValueError(f"class_labels is empty: pass at least one class id in 0..{num_classes - 1}{named}.")
        top = num_classes if embedder.null_class is not None else num_classes - 1
        bad = sorted({int(v) for v in ids if not 0 <= v <= top})
        if bad:
            raise ValueError(f"Unknown class id(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} in class_labels: this model "
                             f"knows 0..{num_classes - 1}"
                             + (f" (and {num_classes} = the null class)." if top == num_classes else "."))

    def condition(self, pipe, values, latent_size):
        return Conditioning(context=pipe.class_embedder(self._labels(pipe, values)))

    def null_values(self, pipe, values):
        null = pipe.class_embedder.null_class
        return None if null is None else {"class_labels": torch.full_like(self._labels(pipe, values), null)}

    def dataset_columns(self, columns):
        return {columns.class_column: "class_labels"}

    # -- training -----------------------------------------------------------------------------------
    def add_training_arguments(self, group):
        add_argument_once(group, "--num_classes", type=positive_int, default=None,
                          help="Class / layout mode: the class count (default: from the dataset).")
        group.add_argument("--class_column", default=None, help="Class mode; default: 'label', else 'group_id' (emoji).")
        group.add_argument("--validation_class_labels", type=non_negative_int, nargs="+", default=None,
                           help="Class mode: the labels of the validation grids.")

    def check_training_args(self, parser, args):
        bad = sorted({c for c in args.validation_class_labels or [] if args.num_classes and c >= args.num_classes})
        if bad:
            parser.error(f"--validation_class_labels {bad}: --num_classes {args.num_classes} allows "
                         f"0..{args.num_classes - 1}.")

    def build_encoders(self, args, train_ds, vae):
        count = self._class_count(args, train_ds)
        embedder = ClassEmbedder(num_classes=count, context_dim=args.context_dim,
                                 class_names=self._class_names(args, train_ds, count))
        return Encoders(trainable={"class_embedder": embedder}, context_dim=args.context_dim)

    @staticmethod
    def _class_names(args, train_ds, count: int) -> list[str] | None:
        """Names stored with the model: a ClassLabel's names, or those of the string column that an id column
        ``X_id`` comes with (``group`` for the emoji ``group_id``) where each id has one name; else none."""
        from datasets import ClassLabel  # datasets is imported only by training

        feature = train_ds.features.get(args.class_column)
        if isinstance(feature, ClassLabel) and len(feature.names) == count:
            return list(feature.names)
        name_column = args.class_column.removesuffix("_id")
        if args.streaming or name_column == args.class_column or name_column not in train_ds.column_names:
            return None
        pairs = set(zip(train_ds[args.class_column], train_ds[name_column]))
        names = dict(pairs)
        if len(names) != len(pairs) or len(set(names.values())) != len(names) or sorted(names) != list(range(count)):
            return None
        return [names[i] for i in range(count)]

    @staticmethod
    def _class_count(args, train_ds) -> int:
        from datasets import ClassLabel  # datasets is imported only by training

        if args.num_classes:
            return args.num_classes
        feature = train_ds.features.get(args.class_column)
        if isinstance(feature, ClassLabel):
            return feature.num_classes
        if args.streaming:
            raise SystemExit(f"--streaming: the class column '{args.class_column}' is not a ClassLabel, so the class "
                             "count is unknown before the stream is read: pass --num_classes.")
        return int(max(train_ds[args.class_column])) + 1

    def validation_values(self, args):
        labels = args.validation_class_labels
        return {"class_labels": torch.tensor(labels)} if labels else None

    # -- generate and the demo ----------------------------------------------------------------------
    def add_generate_arguments(self, parser):
        parser.add_argument("--class_labels", type=class_label, nargs="+", default=None,
                            help="For class-conditional models: class ids or the names the model stores (the "
                                 "built-in emoji-class model: its emoji groups, e.g. \"Food & Drink\").")

    def generate_inputs(self, args):
        return None if args.class_labels is None else {"class_labels": args.class_labels}

    def command_words(self, inputs, folder):
        return ["--class_labels", *(str(c) for c in inputs["class_labels"])]

    def demo_inputs(self, gr, pipe):
        embedder = pipe.class_embedder
        choices = [(embedder.class_name(i), i) for i in range(embedder.config.num_classes)]
        return [gr.Dropdown(choices, value=choices[0][1], label="Class", elem_id="class")], widgets.class_inputs

    def shown_inputs(self, inputs):
        return {"class_labels": inputs["class_labels"]}
