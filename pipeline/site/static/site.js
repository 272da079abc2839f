/* Neuron Atlas static site: search, keyboard navigation, layer grid sorting/filtering/paging, copy button.
   Plain JavaScript, no network: the search index is a local script (fetch() of JSON fails under file://).
   Text from data is only ever set with textContent, never parsed as HTML. */
(function () {
  "use strict";
  var root = document.body.getAttribute("data-root") || "";

  /* ---- search over search-index.js: entries [kind, layer, unit, labels, href] ---- */
  var input = document.getElementById("search");
  var results = document.getElementById("search-results");
  var loading = false;

  function loadIndex(then) {
    if (window.ATLAS_SEARCH) { then(); return; }
    if (loading) { return; }
    loading = true;
    var script = document.createElement("script");
    script.src = root + "search-index.js";
    script.onload = function () { runSearch(); };
    document.head.appendChild(script);
  }

  function matches(entry, tokens) {
    var layer = String(entry[1]).toLowerCase(), labels = String(entry[3]).toLowerCase();
    var unit = entry[2] === null ? "" : String(entry[2]);
    return tokens.every(function (t) {
      if (/^\d+$/.test(t)) { return unit === t || layer.indexOf(t) >= 0; }
      return layer.indexOf(t) >= 0 || labels.indexOf(t) >= 0 || entry[0] === t;
    });
  }

  function runSearch() {
    var query = input.value.trim().toLowerCase();
    results.textContent = "";
    if (!query || !window.ATLAS_SEARCH) { results.hidden = true; return; }
    var tokens = query.split(/[\s:#\/]+/).filter(function (t) { return t; });
    var found = window.ATLAS_SEARCH.filter(function (e) { return matches(e, tokens); }).slice(0, 40);
    found.forEach(function (e) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = root + e[4];
      a.textContent = e[0] === "layer" ? "layer " + e[1]
        : e[0] === "class" ? "class " + e[2] + ": " + e[3]
        : e[1] + " #" + e[2] + (e[3] ? " — " + e[3] : "");
      li.appendChild(a);
      results.appendChild(li);
    });
    if (!found.length) {
      var none = document.createElement("li");
      none.textContent = "no match";
      results.appendChild(none);
    }
    results.hidden = false;
  }

  if (input) {
    input.addEventListener("focus", function () { loadIndex(function () {}); });
    input.addEventListener("input", function () { loadIndex(runSearch); });
    input.addEventListener("keydown", function (event) {
      var first = results.querySelector("a");
      if (event.key === "Enter" && first) { window.location.href = first.href; }
      if (event.key === "Escape") { results.hidden = true; }
    });
  }

  /* ---- previous / next with the arrow keys (unit and class pages) ---- */
  document.addEventListener("keydown", function (event) {
    var tag = (event.target && event.target.tagName) || "";
    if (/^(INPUT|TEXTAREA|SELECT)$/.test(tag) || event.altKey || event.ctrlKey || event.metaKey) { return; }
    var link = event.key === "ArrowLeft" ? document.getElementById("prev")
      : event.key === "ArrowRight" ? document.getElementById("next") : null;
    if (link) { window.location.href = link.href; }
  });

  /* ---- layer grid: sort, filter, page (cards are server-rendered; images load lazily) ---- */
  var grid = document.getElementById("grid");
  if (grid) {
    var cards = Array.prototype.slice.call(grid.children);
    var pageSize = parseInt(grid.getAttribute("data-page-size"), 10) || 240;
    var page = 0;
    var sort = document.getElementById("sort"), descending = document.getElementById("descending");
    var filter = document.getElementById("filter"), hideDead = document.getElementById("hide-dead");
    var status = document.getElementById("grid-status");
    var prevPage = document.getElementById("page-prev"), nextPage = document.getElementById("page-next");

    var apply = function () {
      var key = sort.value, sign = descending.checked ? -1 : 1;
      var query = filter.value.trim().toLowerCase();
      var shown = cards.filter(function (card) {
        if (hideDead.checked && card.classList.contains("dead")) { return false; }
        if (!query) { return true; }
        return card.getAttribute("data-unit") === query ||
          card.getAttribute("data-labels").toLowerCase().indexOf(query) >= 0;
      });
      shown.sort(function (a, b) {
        var x = parseFloat(a.getAttribute("data-" + key)), y = parseFloat(b.getAttribute("data-" + key));
        return sign * (x - y) || (parseInt(a.getAttribute("data-unit"), 10) - parseInt(b.getAttribute("data-unit"), 10));
      });
      var pages = Math.max(1, Math.ceil(shown.length / pageSize));
      page = Math.min(page, pages - 1);
      // Matching cards first, in order, with only the current page visible; the rest hidden after them.
      var fragment = document.createDocumentFragment();
      cards.forEach(function (card) { card.hidden = true; card.atlasShown = false; });
      shown.forEach(function (card, i) {
        card.hidden = Math.floor(i / pageSize) !== page;
        card.atlasShown = true;
        fragment.appendChild(card);
      });
      cards.forEach(function (card) { if (!card.atlasShown) { fragment.appendChild(card); } });
      grid.appendChild(fragment);
      status.textContent = shown.length ? "Showing " + (page * pageSize + 1) + "–" +
        Math.min(shown.length, (page + 1) * pageSize) + " of " + shown.length + " units" +
        (shown.length < cards.length ? " (" + cards.length + " in the layer)" : "") : "No unit matches.";
      prevPage.disabled = page === 0;
      nextPage.disabled = page >= pages - 1;
    };
    // Highest first is what one wants from "top activation" and "fraction active"; unit ids read upwards.
    sort.addEventListener("change", function () { descending.checked = sort.value !== "unit"; page = 0; apply(); });
    [descending, hideDead].forEach(function (el) { el.addEventListener("change", function () { page = 0; apply(); }); });
    filter.addEventListener("input", function () { page = 0; apply(); });
    prevPage.addEventListener("click", function () { page -= 1; apply(); window.scrollTo(0, 0); });
    nextPage.addEventListener("click", function () { page += 1; apply(); window.scrollTo(0, 0); });
    apply();
  }

  /* ---- copy the DuckDB query ---- */
  Array.prototype.forEach.call(document.querySelectorAll("button.copy"), function (button) {
    button.addEventListener("click", function () {
      var text = document.getElementById(button.getAttribute("data-copy")).textContent;
      var done = function () { button.textContent = "Copied"; };
      var fallback = function () {
        var area = document.createElement("textarea");
        area.value = text;
        document.body.appendChild(area);
        area.select();
        try { document.execCommand("copy"); done(); } catch (e) { button.textContent = "Select and copy"; }
        document.body.removeChild(area);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, fallback);
      } else { fallback(); }
    });
  });
}());
