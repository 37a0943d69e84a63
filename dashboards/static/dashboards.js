// Renders every widget of a dashboard page from the KPI API (/dashboards/api/kpis/...).
// No framework; Chart.js (vendored) draws lines and bars. State is exposed on
// window.cdpDashboard for the end-to-end tests: data per widget and chart instances.
(function () {
  "use strict";

  var PALETTE = [
    "#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed",
    "#0891b2", "#db2777", "#65a30d", "#ea580c", "#475569",
  ];
  var numberFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });

  var state = { data: {}, charts: {}, errors: {}, ready: false };
  window.cdpDashboard = state;

  function formatNumber(value) {
    return value === null || value === undefined ? "–" : numberFormat.format(value);
  }

  function formatPeriod(period, grain) {
    var d = new Date(period + "T00:00:00Z");
    if (grain === "month") {
      return d.toLocaleDateString("en-GB", { month: "short", year: "numeric", timeZone: "UTC" });
    }
    return d.toLocaleDateString("en-GB", { day: "numeric", month: "short", timeZone: "UTC" });
  }

  // {periods: [...], series: [{key, values: [...]}]} from the API's long points; a period
  // without a point (ratios and averages with nothing to divide) stays null: no value.
  function pivot(body) {
    var periods = [];
    var seen = {};
    body.points.forEach(function (p) {
      if (!(p.period in seen)) {
        seen[p.period] = periods.length;
        periods.push(p.period);
      }
    });
    var keys = body.keys.length ? body.keys : [null];
    var series = keys.map(function (key) {
      var values = periods.map(function () { return null; });
      body.points.forEach(function (p) {
        if (p.key === key) { values[seen[p.period]] = p.value; }
      });
      return { key: key, values: values };
    });
    return { periods: periods, series: series };
  }

  function renderNumber(el, body) {
    var value = el.querySelector(".kpi-value");
    value.textContent = formatNumber(body.total);
    value.dataset.value = body.total === null ? "" : String(body.total);
  }

  function renderTable(el, body, widget) {
    var table = pivot(body);
    var thead = el.querySelector("thead");
    var tbody = el.querySelector("tbody");
    var head = document.createElement("tr");
    var first = document.createElement("th");
    first.textContent = widget.grain === "day" ? "Day" : widget.grain === "week" ? "Week of" : "Month";
    head.appendChild(first);
    table.series.forEach(function (s) {
      var th = document.createElement("th");
      th.textContent = s.key === null ? body.title : s.key;
      th.className = "num";
      head.appendChild(th);
    });
    thead.replaceChildren(head);
    var rows = table.periods.map(function (period, i) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      td.textContent = period;
      tr.appendChild(td);
      table.series.forEach(function (s) {
        var cell = document.createElement("td");
        cell.className = "num";
        cell.textContent = formatNumber(s.values[i]);
        cell.dataset.value = s.values[i] === null ? "" : String(s.values[i]);
        tr.appendChild(cell);
      });
      return tr;
    });
    rows.reverse();  // most recent first
    tbody.replaceChildren.apply(tbody, rows);
  }

  function renderChart(el, body, widget) {
    var table = pivot(body);
    var isBar = widget.chart === "bar";
    var stacked = isBar && table.series.length > 1;
    var datasets = table.series.map(function (s, i) {
      var color = PALETTE[i % PALETTE.length];
      return {
        label: s.key === null ? body.title : s.key,
        data: s.values,
        borderColor: color,
        backgroundColor: isBar ? color : color + "22",
        borderWidth: isBar ? 0 : 2,
        pointRadius: table.periods.length > 40 ? 0 : 2,
        tension: 0.25,
        fill: !isBar && table.series.length === 1,
        borderRadius: isBar ? 3 : 0,
        maxBarThickness: 36,
      };
    });
    var canvas = el.querySelector("canvas");
    state.charts[widget.id] = new window.Chart(canvas, {
      type: isBar ? "bar" : "line",
      data: {
        labels: table.periods.map(function (p) { return formatPeriod(p, widget.grain); }),
        datasets: datasets,
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: {
            display: table.series.length > 1,
            position: "bottom",
            labels: { boxWidth: 10, boxHeight: 10, usePointStyle: true },
          },
          tooltip: {
            callbacks: {
              label: function (ctx) {
                return ctx.dataset.label + ": " + formatNumber(ctx.parsed.y) + " " + body.unit;
              },
            },
          },
        },
        scales: {
          x: { stacked: stacked, grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 12 } },
          y: { stacked: stacked, beginAtZero: true, ticks: { precision: 0 }, grid: { color: "#eef2f7" } },
        },
      },
    });
  }

  function renderWidget(widget) {
    var el = document.getElementById(widget.id);
    return fetch(widget.dataUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) {
            var message = body && body.error ? body.error.message : response.statusText;
            throw new Error(message);
          }
          return body;
        });
      })
      .then(function (body) {
        state.data[widget.id] = body;
        if (widget.chart === "number") {
          renderNumber(el, body);
        } else if (widget.chart === "table") {
          renderTable(el, body, widget);
        } else {
          renderChart(el, body, widget);
        }
        if (body.snapshot_days.length) {
          el.querySelector(".widget-sub").textContent +=
            " · " + body.snapshot_days.length + " day(s) from snapshots";
        }
        el.dataset.state = "ready";
      })
      .catch(function (error) {
        state.errors[widget.id] = String(error.message || error);
        var box = el.querySelector(".widget-error");
        box.textContent = "Could not load: " + state.errors[widget.id];
        box.hidden = false;
        el.dataset.state = "error";
      });
  }

  function setUpRange() {
    var form = document.getElementById("range-form");
    if (!form) { return; }
    var from = document.getElementById("range-from");
    var to = document.getElementById("range-to");
    // A programme or segment choice applies at once (the dates already in the form go along).
    Array.prototype.forEach.call(form.querySelectorAll("select.auto-apply"), function (select) {
      select.addEventListener("change", function () {
        if (form.requestSubmit) { form.requestSubmit(); } else { form.submit(); }
      });
    });
    form.addEventListener("submit", function (event) {
      if (from.value && to.value && from.value > to.value) {
        event.preventDefault();
        to.setCustomValidity("The end is before the start");
        to.reportValidity();
      } else {
        to.setCustomValidity("");
      }
    });
  }

  function main() {
    setUpRange();
    var node = document.getElementById("dashboard-config");
    var config = node ? JSON.parse(node.textContent) : { widgets: [] };
    if (window.Chart) {
      window.Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
      window.Chart.defaults.color = "#475569";
    }
    Promise.all(config.widgets.map(renderWidget)).then(function () {
      state.ready = true;
      document.body.dataset.state = "ready";
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", main);
  } else {
    main();
  }
})();
