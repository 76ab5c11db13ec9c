// MathJax for pymdownx.arithmatex (generic mode): \( … \) inline, \[ … \] display.
// The library itself is vendor/mathjax/tex-svg.js: MathJax 3.2.2's es5/tex-svg.js from the npm
// package mathjax@3.2.2, unchanged (Apache-2.0, vendor/mathjax/LICENSE); SVG output needs no
// font files, so the one file renders every formula offline.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};
document$.subscribe(() => { MathJax.typesetPromise(); });
