"""Argument groups shared across subcommands."""

from __future__ import annotations

import functools
import logging

import click


class ExpertOption(click.Option):
    """An option ``--help`` leaves out and ``--help-all`` lists (docs/cli.md documents each)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("hidden", True)
        super().__init__(*args, **kwargs)


def help_all(func):
    """``--help-all``: the command's help with its expert options."""

    def show(ctx: click.Context, _param, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        experts = [p for p in ctx.command.params if isinstance(p, ExpertOption) and p.hidden]
        for param in experts:
            param.hidden = False
        try:
            click.echo(ctx.get_help())
        finally:  # the command object outlives this call (tests, embedding): --help stays short afterwards
            for param in experts:
                param.hidden = True
        ctx.exit()

    return click.option("--help-all", is_flag=True, expose_value=False, is_eager=True, callback=show,
                        help="Show the expert options too (documented in docs/cli.md).")(func)


def verbosity(func):
    @click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
    @click.option("-q", "--quiet", is_flag=True, help="Only errors and the final result line.")
    @functools.wraps(func)
    def wrapper(*args, verbose: int, quiet: bool, **kwargs):
        level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
        logging.basicConfig(level=level, format="[%(levelname)s] %(name)s: %(message)s", force=True)
        return func(*args, quiet=quiet, **kwargs)

    return wrapper


def preprocessing(func=None, *, expert: bool = False):
    """--preset, --resize, --crop, --input-size, --mean, --std, --scale, --channel-order, --layout, --workers;
    with ``expert`` all but --preset are :class:`ExpertOption` s."""
    if func is None:
        return functools.partial(preprocessing, expert=expert)
    detail = ExpertOption if expert else click.Option

    @click.option("--preset", type=click.Choice(["imagenet", "caffe", "tf", "none"]), default=None,
                  help="Named preprocessing (imagenet: resize 256, crop 224, ImageNet mean/std).")
    @click.option("--resize", cls=detail, type=int, default=None,
                  help="Resize the shorter image side to this many pixels.")
    @click.option("--crop", cls=detail, type=str, default=None, help="Center crop, N or HxW.")
    @click.option("--input-size", cls=detail, type=str, default=None,
                  help="Model input size HxW (needed for dynamic inputs).")
    @click.option("--mean", cls=detail, type=str, default=None, help="Per-channel mean, comma separated (after --scale).")
    @click.option("--std", cls=detail, type=str, default=None, help="Per-channel std, comma separated (after --scale).")
    @click.option("--scale", cls=detail, type=str, default=None, help="Pixel scale applied before mean/std, e.g. 1/255.")
    @click.option("--channel-order", cls=detail, type=click.Choice(["rgb", "bgr", "gray"]), default=None)
    @click.option("--layout", cls=detail, type=click.Choice(["nchw", "nhwc"]), default=None)
    @click.option("--workers", cls=detail, type=int, default=2, show_default=True, help="Image decoding processes.")
    @functools.wraps(func)
    def wrapper(*args, preset, resize, crop, input_size, mean, std, scale, channel_order, layout, workers, **kwargs):
        from onnxsparse.data import PreprocessConfig

        # The strings are parsed and checked by PreprocessConfig, with the option's name in the message.
        pre = PreprocessConfig(
            preset=preset, resize=resize, crop=crop, input_size=input_size, mean=mean, std=std, scale=scale,
            channel_order=channel_order, layout=layout, workers=workers,
        )
        return func(*args, preprocess=pre, **kwargs)

    return wrapper
