"""A tiny live plot for the Train dock: training loss and validation mIoU against the iteration.

Painted with QPainter (no matplotlib): two polylines, each scaled to its own range — loss on the left axis
(0 .. max), mIoU on the right axis (0 .. 1).
"""
from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

LOSS_COLOR = QColor(230, 120, 30)
MIOU_COLOR = QColor(60, 160, 230)


class CurvesWidget(QWidget):
    """Call ``add_loss(iteration, loss)`` and ``add_miou(iteration, miou)``; ``clear()`` starts over."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.loss: list[tuple[float, float]] = []
        self.miou: list[tuple[float, float]] = []
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def clear(self) -> None:
        self.loss.clear()
        self.miou.clear()
        self.update()

    def add_loss(self, iteration: float, value: float) -> None:
        self.loss.append((float(iteration), float(value)))
        self.update()

    def add_miou(self, iteration: float, value: float) -> None:
        self.miou.append((float(iteration), float(value)))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        margin = 28.0
        plot = QRectF(margin, 8.0, max(1.0, self.width() - 2 * margin), max(1.0, self.height() - 26.0))
        p.setPen(QPen(self.palette().text().color(), 1))
        p.drawRect(plot)
        last_x = max([x for x, _ in self.loss + self.miou] or [1.0])
        top_loss = max([v for _, v in self.loss] or [1.0]) or 1.0
        self._polyline(p, self.loss, plot, last_x, top_loss, LOSS_COLOR)
        self._polyline(p, self.miou, plot, last_x, 1.0, MIOU_COLOR)
        p.setPen(LOSS_COLOR)
        p.drawText(QRectF(0, plot.top() - 6, margin - 2, 14), Qt.AlignmentFlag.AlignRight, f"{top_loss:.2g}")
        p.setPen(MIOU_COLOR)
        p.drawText(QRectF(plot.right() + 2, plot.top() - 6, margin, 14), Qt.AlignmentFlag.AlignLeft, "1")
        text = f"loss {self.loss[-1][1]:.3f}" if self.loss else "loss"
        if self.miou:
            text += f"   val mIoU {self.miou[-1][1]:.3f} (best {max(v for _, v in self.miou):.3f})"
        p.setPen(self.palette().text().color())
        p.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), 16), Qt.AlignmentFlag.AlignLeft, text)
        p.end()

    @staticmethod
    def _polyline(p: QPainter, points, plot: QRectF, last_x: float, top: float, color: QColor) -> None:
        if not points:
            return
        poly = QPolygonF(
            [
                QPointF(plot.left() + plot.width() * x / last_x, plot.bottom() - plot.height() * min(v / top, 1.0))
                for x, v in points
            ]
        )
        p.setPen(QPen(color, 1.5))
        if len(points) == 1:
            p.drawEllipse(poly[0], 2.0, 2.0)
        else:
            p.drawPolyline(poly)
