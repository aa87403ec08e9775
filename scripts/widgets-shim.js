// Loaded between require.js and the widget manager (embed-amd.js) on pages with saved widgets;
// scripts/fetch_widget_js.sh copies it to _static/widgets/shim.js. It makes three fixes:
//
// 1. Fonts: embed-amd.js finds its icon fonts next to the RequireJS module path of its bundles
//    ("@jupyter-widgets/..." resolved against the page), which is not where the files are. Map
//    those module names to this folder, so the fonts load from _static/widgets/.
// 2. Icons: the theme's Font Awesome script swaps every <i class="fa ..."> for an <svg>, but
//    the Play widget looks up its <i> to switch play/pause and throws when it is gone. Ask Font
//    Awesome (loaded with defer, so after this file) to nest the <svg> inside the <i> instead,
//    and hide that <svg> in widgets: their own CSS already draws the icon from the widget fonts.
// 3. Math: the widgets typeset labels with MathJax 2's MathJax.Hub.Queue, but Sphinx loads
//    MathJax 3, which has no Hub; every widget then throws. Give MathJax 3 a small Hub that
//    forwards to MathJax.typesetPromise.
(function () {
  var here = document.currentScript.src.replace(/[^/]*$/, "");  // .../_static/widgets/
  var names = ["@jupyter-widgets/base", "@jupyter-widgets/base7", "@jupyter-widgets/controls",
    "@jupyter-widgets/controls7", "@jupyter-widgets/html-manager",
    "@jupyter-widgets/html-manager/dist/libembed-amd"];
  var paths = {};
  names.forEach(function (name) { paths[name] = here + name.replace(/[/@]/g, "_"); });
  window.require.config({ paths: paths });

  window.FontAwesomeConfig = Object.assign(window.FontAwesomeConfig || {},
    { autoReplaceSvg: "nest" });
  var style = document.createElement("style");
  style.textContent = ".jupyter-widgets i.fa > svg { display: none; }";
  document.head.appendChild(style);

  function addHub() {
    var mj = window.MathJax;
    if (!mj || mj.Hub || !mj.version || mj.version.charAt(0) !== "3") return;
    mj.Hub = {
      Queue: function (job) {
        var element = job && job[2];
        var ready = (mj.startup && mj.startup.promise) || Promise.resolve();
        ready.then(function () {
          return mj.typesetPromise ? mj.typesetPromise(element ? [element] : undefined) : null;
        }).catch(function (err) { console.warn("MathJax typeset of a widget failed", err); });
      }
    };
  }
  // MathJax is loaded with defer: it exists once the document is parsed, before the widget
  // manager renders. Until then window.MathJax is Sphinx's plain config object (no version).
  document.addEventListener("DOMContentLoaded", addHub);
  window.addEventListener("load", addHub);
})();
