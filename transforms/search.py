"""Searching a feature table through its index: by a row's id, by an image's bytes (embedded
with the table's own recipe, exactly as the pipeline embeds a file), or by words for the
two-tower (CLIP, SigLIP) tables; and the thumbnails of the table's images, by id only.

No web framework here (``transforms.search_app`` serves this over HTTP): every method takes
plain values and returns plain values, and every bad request is a :class:`QueryError` carrying
the HTTP status it deserves and a sentence saying why.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from typing import Any

import numpy as np

from transforms import storage
from transforms.images import ImageError, Target, load_images
from transforms.index import SearchIndex
from transforms.search_generations import Following

_LOG = logging.getLogger(__name__)

#: The most results one search may ask for.
MAX_K = 1000
DEFAULT_K = 20
#: Thumbnail side in pixels, and how many encoded thumbnails are kept in memory.
THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE = 1024
#: An uploaded image with more pixels than this is refused before decoding: a 40 MP image is
#: 120 MB of RGB while it is resized, and a few at once must fit a small server.
DEFAULT_MAX_PIXELS = 40_000_000
#: Seconds reading one table image for its thumbnail may take.
READ_TIMEOUT_S = 20.0
#: Filter masks (label, split) kept; any value may be asked for, so the cache is bounded.
_MASKS = 64


class QueryError(ValueError):
    """A request that cannot be answered: ``status`` is its HTTP status, the message says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Hit:
    """One result, best first."""

    image_id: str
    uri: str
    similarity: float
    label: str | None
    split: str | None


class Searcher:
    """A table's index and the model that made its vectors, loaded once; :meth:`refresh` (or
    :meth:`follow`, in a thread) moves on to the index's newest generation once
    ``featurebeam index`` commits one (``transforms.search_generations``).

    Args:
        index: the table's index (``transforms.index``).
        features_dir: the table, for health and messages.
        recipe: the recipe rebuilt from the table's metadata, or None when it cannot be (then
            image uploads answer 400 with ``recipe_error``).
        recipe_error: why there is no recipe.
        max_pixels: decompression-bomb guard for uploads.
        load_model: build the image model now (the service does; tests of the by-id path need
            not).
    """

    def __init__(
        self,
        index: SearchIndex,
        *,
        features_dir: str,
        recipe=None,
        recipe_error: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        load_model: bool = True,
    ):
        self._served = Following(index)
        self.features_dir = features_dir
        self.recipe = recipe
        self.recipe_error = recipe_error or ("" if recipe else "the table records no recipe")
        self.max_pixels = max_pixels
        self._embedder = None
        self._text = None
        self._text_error = "" if recipe else self.recipe_error
        # One model call at a time: TensorFlow already uses every core for one image, and a
        # burst of uploads then waits here holding only its bytes, so memory stays bounded.
        self._model_lock = threading.Lock()
        self._cache_lock = threading.Lock()  # the generations' masks and thumbnails
        if recipe is not None:
            self._text_error = _text_unavailable(recipe)
            if load_model:
                self._load()

    # --- models ---

    def _load(self) -> None:
        from transforms.embed.handler import BackboneModelHandler

        started = time.monotonic()
        handler = BackboneModelHandler(self.recipe, batch_size=1)
        self._target = Target(tuple(handler.input_size), handler.resize, handler.interpolation)
        self._embedder = handler.load_model()
        if not self._text_error:
            from transforms.models.zero_shot import text_encoder

            self._text = text_encoder(self.recipe)
        _LOG.info("model loaded in %.1f s", time.monotonic() - started)

    @property
    def text_search(self) -> bool:
        return not self._text_error

    @property
    def index(self) -> SearchIndex:
        """The generation of the index served now."""
        return self._served.current.index

    @property
    def stale(self) -> str:
        """Why the index's newest generation is not served ('' when it is)."""
        return self._served.stale

    def refresh(self) -> bool:
        """See ``search_generations.Following.refresh``."""
        return self._served.refresh()

    def follow(self, every: float, stop: threading.Event) -> None:
        """See ``search_generations.Following.follow``."""
        self._served.follow(every, stop)

    # --- searches ---

    def by_id(self, image_id: str, k: int, *, label=None, split=None) -> list[Hit]:
        """The ``k`` rows nearest to row ``image_id`` (itself left out).

        Raises:
            QueryError: 404 for an id that is not in the table.
        """
        gen = self._served.current
        allowed = self._allowed(gen, k, label, split)
        try:
            position = gen.index.position_of(image_id)
        except KeyError:
            raise QueryError(404, f"no image {image_id!r} in the table") from None
        query = gen.index.vector_at(position)[None]
        return self._search(gen, query, k, allowed, exclude=position)

    def by_image(self, data: bytes, k: int, *, label=None, split=None) -> list[Hit]:
        """The ``k`` rows nearest to an encoded image, embedded with the table's recipe.

        Raises:
            QueryError: 400 for bytes that are not a whole image, too many pixels, or a table
                whose recipe cannot be rebuilt.
        """
        if self.recipe is None:
            raise QueryError(400, f"cannot embed an image for this table: {self.recipe_error}")
        gen = self._served.current
        allowed = self._allowed(gen, k, label, split)  # before the model: a typo costs nothing
        if self._embedder is None:
            self._load()
        with self._model_lock:  # the decoded pixels exist only while the model is free
            try:
                image = load_images(data, [self._target], max_pixels=self.max_pixels)[0]
            except ImageError as exc:
                raise QueryError(400, f"the upload is not a usable image: {exc.reason}") from None
            vector = np.asarray(self._embedder(image.pixels[None]), np.float32)
        return self._search(gen, vector, k, allowed)

    def by_text(self, text: str, k: int, *, label=None, split=None) -> list[Hit]:
        """The ``k`` rows nearest to the text tower's embedding of ``text``.

        Raises:
            QueryError: 400 when the table has no text tower, or for empty text.
        """
        if not text.strip():
            raise QueryError(422, "text must not be empty")
        if self._text_error:
            raise QueryError(
                400, f"text search is not available for this table: {self._text_error}"
            )
        gen = self._served.current
        allowed = self._allowed(gen, k, label, split)
        if self._text is None:
            self._load()
        with self._model_lock:
            vector = np.asarray(self._text([text]), np.float32)
        return self._search(gen, vector, k, allowed)

    def _search(self, gen, query, k, allowed, *, exclude: int | None = None) -> list[Hit]:
        extra = 1 if exclude is not None else 0
        with gen.search_lock:
            sims, positions = gen.index.search(query, k + extra, allowed=allowed)
        hits = []
        for sim, position in zip(sims[0], positions[0], strict=True):
            if position < 0 or position == exclude or len(hits) == k:
                continue
            hits.append(
                Hit(
                    image_id=gen.ids[position],
                    uri=gen.uris[position],
                    similarity=round(float(sim), 6),
                    label=gen.labels[position],
                    split=gen.splits[position],
                )
            )
        return hits

    def _allowed(self, gen, k: int, label: str | None, split: str | None) -> np.ndarray | None:
        """Checks ``k`` and the filters; returns the rows the filters allow (None: all). A
        label or split that no row has is a mistake to name (a typo answered with no results
        looks like a search that found nothing)."""
        if not 1 <= k <= MAX_K:
            raise QueryError(422, f"k must be between 1 and {MAX_K}, got {k}")
        if label is None and split is None:
            return None
        for name, value, known in (
            ("label", label, gen.label_set),
            ("split", split, gen.split_set),
        ):
            if value is not None and value not in known:
                names = sorted(known)
                some = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                raise QueryError(422, f"no row has {name} {value!r}; the table's: {some or 'none'}")
        key = (label, split)
        with self._cache_lock:
            if key in gen.masks:
                gen.masks.move_to_end(key)
                return gen.masks[key]
        mask = np.ones(len(gen.ids), bool)
        if label is not None:
            mask &= gen.labels == label
        if split is not None:
            mask &= gen.splits == split
        with self._cache_lock:
            gen.masks[key] = mask
            while len(gen.masks) > _MASKS:
                gen.masks.popitem(last=False)
        return mask

    # --- thumbnails and health ---

    def thumbnail(self, image_id: str) -> bytes:
        """A JPEG thumbnail of the table image ``image_id``: looked up in the table, never
        taken from the request as a path.

        Raises:
            QueryError: 404 for an id not in the table or an image that cannot be read now.
        """
        gen = self._served.current  # its cache: a pruned image's thumbnail goes with it
        with self._cache_lock:
            if image_id in gen.thumbnails:
                gen.thumbnails.move_to_end(image_id)
                return gen.thumbnails[image_id]
        try:
            uri = gen.uris[gen.index.position_of(image_id)]
        except KeyError:
            raise QueryError(404, f"no image {image_id!r} in the table") from None
        try:
            data = storage.read_bytes(uri, timeout=READ_TIMEOUT_S)
            encoded = _thumbnail(data, self.max_pixels)
        except Exception as exc:  # moved, deleted, unreadable since the table was made
            # The cause names a path on the server: it goes to the server's log, not the client.
            _LOG.warning("thumbnail of %s (%s): %s", image_id, uri, exc)
            raise QueryError(
                404,
                f"image {image_id!r} cannot be read now (moved or deleted since it was embedded?)",
            ) from None
        with self._cache_lock:
            gen.thumbnails[image_id] = encoded
            while len(gen.thumbnails) > THUMBNAIL_CACHE:
                gen.thumbnails.popitem(last=False)
        return encoded

    def health(self) -> dict[str, Any]:
        gen = self._served.current
        meta = gen.index.metadata
        recipe = {
            key: meta[key]
            for key in (
                "backbone",
                "weights",
                "weights_fingerprint",
                "input_size",
                "pooling",
                "layer",
                "resize",
                "precision",
                "feature_dim",
            )
            if meta.get(key)
        }
        return {
            "status": "ok",
            "table": self.features_dir,
            "rows": len(gen.index),
            "index": gen.index.kind,
            "index_generation": gen.index.generation,
            "index_updated_at": gen.index.manifest.get("updated_at"),
            "index_stale": self.stale,
            "recipe": recipe,
            "image_search": self.recipe is not None,
            "image_search_unavailable": "" if self.recipe else self.recipe_error,
            "text_search": self.text_search,
            "text_search_unavailable": self._text_error,
            "labels": sorted(gen.label_set)[:200],
            "splits": sorted(gen.split_set),
            "max_k": MAX_K,
        }


def _text_unavailable(recipe) -> str:
    """Why a table's vectors cannot be searched by words ('' when they can)."""
    from transforms.models.zero_shot import check_zero_shot

    try:
        check_zero_shot(recipe)
    except ValueError as exc:
        return str(exc).replace("zero-shot --labels", "text search")
    if recipe.layer or recipe.pooling != "cls":
        return (
            f"its vectors are the {recipe.output_name} readout; words are embedded in the "
            "image-text space of the cls embedding (a table made with --pooling cls)"
        )
    return ""


def _thumbnail(data: bytes, max_pixels: int) -> bytes:
    from PIL import Image, ImageOps

    from transforms.images import open_image

    image = open_image(data, max_pixels)
    with image:
        image.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        picture = ImageOps.exif_transpose(image).convert("RGB")
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, format="JPEG", quality=85)
    return out.getvalue()
