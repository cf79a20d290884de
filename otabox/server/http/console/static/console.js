// otabox console: the little behaviour htmx does not cover. Loaded from /ui/static (no inline script: CSP).
(function () {
  "use strict";

  function uploadBar(evt) {
    var form = evt.target && evt.target.closest ? evt.target.closest("form[data-upload]") : null;
    return form ? document.getElementById(form.getAttribute("data-upload")) : null;
  }

  function show(bar, pct, text) {
    bar.value = pct;
    bar.textContent = pct + " %";
    var label = document.getElementById(bar.id + "-text");
    if (label) label.textContent = text;
  }

  // Upload progress: htmx sends multipart forms with XHR and reports upload progress events.
  document.addEventListener("htmx:beforeRequest", function (evt) {
    var bar = uploadBar(evt);
    if (bar) show(bar, 0, "starting upload…");
  });
  document.addEventListener("htmx:xhr:progress", function (evt) {
    var bar = uploadBar(evt);
    var d = evt.detail || {};
    if (!bar || !d.lengthComputable || !d.total) return;
    var pct = Math.min(100, Math.round((d.loaded / d.total) * 100));
    if (pct < bar.value) return; // the response's own download progress follows; keep the upload's
    show(bar, pct, pct < 100 ? "uploading " + pct + " %" : "upload sent; the server is checking the file…");
  });
  document.addEventListener("htmx:afterRequest", function (evt) {
    var bar = uploadBar(evt);
    if (bar) show(bar, 100, evt.detail && evt.detail.successful ? "done" : "failed");
  });
  document.addEventListener("htmx:afterSwap", function (evt) {
    var target = evt.detail && evt.detail.target;
    if (target && target.id === "upload-result") {
      var form = document.getElementById("upload-form");
      if (form && target.querySelector(".result")) form.reset();
    }
  });

})();
