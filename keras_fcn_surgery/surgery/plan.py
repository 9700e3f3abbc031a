"""The list of rewrites a conversion makes, printable as a table."""

from __future__ import annotations

from dataclasses import dataclass

from keras_fcn_surgery.surgery.rules.base import Rewrite


@dataclass(frozen=True)
class ConversionPlan:
    """What `convert` does to a model.

    Attributes:
        model_name: the source model's name.
        input_size: ``(height, width)`` the source was built for.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        head: ``"window"`` or ``"dense"``.
        rewrites: one `Rewrite` per changed layer, in graph order; its
            ``kind`` (a `RewriteKind`) says what changed, for code to test
            (the class names and ``detail`` are for the table).
    """

    model_name: str
    input_size: tuple[int, int]
    data_format: str
    head: str
    rewrites: tuple[Rewrite, ...]

    @property
    def parameters(self) -> int:
        """Parameters held by the rewritten layers."""
        return sum(rewrite.parameters for rewrite in self.rewrites)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """Table rows: layer name, old form, new form, parameters or detail."""
        rows = []
        for rewrite in self.rewrites:
            old = rewrite.old_class + (f" {rewrite.old_shapes[0]}" if rewrite.old_shapes else "")
            new = rewrite.new_class + (f" {rewrite.new_shapes[0]}" if rewrite.new_shapes else "")
            if rewrite.new_shapes:
                last = f"{rewrite.parameters:,} params" + (f"  ({rewrite.detail})" if rewrite.detail else "")
            else:
                last = rewrite.detail
            rows.append((rewrite.layer_name, old, new, last))
        return rows

    def table(self) -> str:
        """The plan as aligned text, one rewrite a line."""
        rows = self.rows()
        if not rows:
            return f"{self.model_name}: already fully convolutional; only the input size is relaxed."
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            f"{name:<{widths[0]}}  {old:<{widths[1]}} -> {new:<{widths[2]}}  {last}".rstrip()
            for name, old, new, last in rows
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
