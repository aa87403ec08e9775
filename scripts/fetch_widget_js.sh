#!/usr/bin/env bash
# Fetch the JavaScript the built book needs to render widgets and math, from the npm registry, so
# no page loads anything from a CDN. Nothing here is committed: the files land in _offline/
# (gitignored), which _config.yml copies into the book with `html_extra_path: [_offline]`:
#   _offline/_static/widgets/require.js      RequireJS (myst-nb's nb_ipywidgets_js loads it first)
#   _offline/_static/widgets/shim.js         scripts/widgets-shim.js: font paths, MathJax 3 bridge
#   _offline/_static/widgets/embed-amd.js    @jupyter-widgets/html-manager: renders saved widget state
#   _offline/_static/mathjax/tex-mml-chtml.js  MathJax 3 (Sphinx's mathjax_path), with its fonts
# Not _static/: Jupyter Book adds every .js under _static to *every* page, which would load
# RequireJS and the 3.6 MB widget bundle on pages without widgets.
#
# html-manager 1.0.x renders the widget state that ipywidgets 8 saves (@jupyter-widgets/controls
# 2.0.0 state, rendered by its bundled controls 5.x) and still reads ipywidgets 7 state. Keep it in
# step with the installed ipywidgets: 1.0.15 is the release of ipywidgets 8.1.7+ / jupyterlab_widgets
# 3.0.15+. Usage: scripts/fetch_widget_js.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."

HTML_MANAGER=1.0.15
REQUIREJS=2.3.8
MATHJAX=3.2.2
DEST=_offline/_static
WANT="@jupyter-widgets/html-manager@$HTML_MANAGER requirejs@$REQUIREJS mathjax@$MATHJAX"

if [ "${1:-}" != "--force" ] && [ -f "$DEST/.versions" ] && [ "$(cat "$DEST/.versions")" = "$WANT" ] \
    && [ -f "$DEST/widgets/embed-amd.js" ] && [ -f "$DEST/mathjax/tex-mml-chtml.js" ]; then
  cp scripts/widgets-shim.js "$DEST/widgets/shim.js"
  echo "fetch_widget_js: $DEST already holds $WANT"
  exit 0
fi
command -v npm >/dev/null || {
  echo "fetch_widget_js: npm is needed to fetch the widget JavaScript (install Node.js, e.g. apt-get install npm)" >&2
  exit 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# npm pack downloads each tarball from the registry and checks its integrity hash.
# shellcheck disable=SC2086
(cd "$tmp" && npm pack --silent $WANT >/dev/null)
for t in "$tmp"/*.tgz; do
  mkdir -p "${t%.tgz}" && tar -xzf "$t" -C "${t%.tgz}"
done

rm -rf "$DEST"
mkdir -p "$DEST/widgets" "$DEST/mathjax"
hm="$tmp/jupyter-widgets-html-manager-$HTML_MANAGER/package/dist"
# The AMD bundle and the Font Awesome fonts of its icons (the Play and Stop buttons) in the formats
# browsers pick first; embed.js is the non-AMD twin and not needed.
cp "$hm/embed-amd.js" "$hm"/*.woff2 "$hm"/*.woff "$DEST/widgets/"
cp "$tmp/requirejs-$REQUIREJS/package/require.js" "$DEST/widgets/require.js"
# Our own fixes for fonts and MathJax 3, loaded between the two (see the file).
cp scripts/widgets-shim.js "$DEST/widgets/shim.js"
# MathJax: the combined TeX + CHTML component, the TeX extensions it may autoload, its fonts, and
# the menu/accessibility pieces it loads on demand (about 3 MB of the package's 24 MB).
mj="$tmp/mathjax-$MATHJAX/package/es5"
cp "$mj/tex-mml-chtml.js" "$DEST/mathjax/"
mkdir -p "$DEST/mathjax/input/tex" "$DEST/mathjax/output/chtml"
cp -r "$mj/input/tex/extensions" "$DEST/mathjax/input/tex/"
cp -r "$mj/output/chtml/fonts" "$DEST/mathjax/output/chtml/"
cp -r "$mj/a11y" "$mj/ui" "$DEST/mathjax/"
for f in LICENSE; do  # keep the licenses beside the code
  cp "$tmp/mathjax-$MATHJAX/package/$f" "$DEST/mathjax/$f" 2>/dev/null || true
done
cp "$tmp/requirejs-$REQUIREJS/package/README.md" "$DEST/widgets/requirejs-README.md" 2>/dev/null || true
echo "$WANT" > "$DEST/.versions"
echo "fetch_widget_js: $WANT -> $DEST ($(du -sh "$DEST" | cut -f1))"
