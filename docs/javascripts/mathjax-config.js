// MathJax 3 settings for pymdownx.arithmatex (generic mode): typeset only the spans and
// blocks arithmatex marks, with \( \) and \[ \] delimiters. The MathJax bundle itself is
// fetched by `make docs` (npm) into docs/assets/mathjax/; it is not part of the repository.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
