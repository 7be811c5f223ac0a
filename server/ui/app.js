// Start-up: ask for the API key when the server wants one (kept in this tab's session storage
// only), load what the server serves, and switch between the playground and the dashboard.

import { api, apiKey, setApiKey } from "./api.js";
import { Dashboard } from "./dashboard.js";
import { Playground } from "./playground.js";

const $ = (selector) => document.querySelector(selector);
const PAGES = ["playground", "dashboard"];
let dashboard = null;

function showKeyPanel(message) {
  $("#app").hidden = true;
  $("#key-panel").hidden = false;
  $("#key-status").textContent = message;
  $("#key-input").focus();
}

function route(moveFocus) {
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "playground";
  for (const name of PAGES) {
    $(`#${name}`).hidden = name !== page;
    const link = $(`#nav-${name}`);
    if (name === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (page === "dashboard" && dashboard) dashboard.refresh();
  if (moveFocus) $(`#${page} h2`).focus();
}

async function start() {
  const tried = apiKey();
  const models = await api("/v1/models");
  if (!models.ok) {
    if (models.error.status === 401) {
      showKeyPanel(tried ? `The server refused this key: ${models.error.message}` : "");
      if (apiKey() === tried) setApiKey("");  // not one entered meanwhile
    } else {
      $("#app-status").textContent = `Cannot reach the API (${models.error.status}): ${models.error.message}`;
    }
    return;
  }
  const [strategies, profiles, rewards] = await Promise.all([
    api("/v1/alignment/strategies"), api("/v1/alignment/profiles"), api("/v1/alignment/rewards")]);
  for (const result of [strategies, profiles, rewards]) {
    if (!result.ok) {
      $("#app-status").textContent = `Cannot load the server's options: ${result.error.message}`;
      return;
    }
  }
  const names = models.data.data.map((m) => m.id);
  $("#key-panel").hidden = true;
  $("#app").hidden = false;
  $("#forget-key").hidden = !apiKey();
  $("#server-model").textContent = `Model: ${names[0]}`;
  $("#app-status").textContent = "";
  new Playground($("#playground"), {
    models: names.filter((n) => !n.includes("@")),
    strategies: strategies.data.data,
    profiles: profiles.data.data,
    rewards: rewards.data.data.filter((r) => r.kind !== "guide").map((r) => r.name),
  });
  dashboard = new Dashboard($("#dashboard"));
  window.addEventListener("hashchange", () => route(true));
  route(false);
  document.body.dataset.ready = "true";
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey($("#key-input").value.trim());
  $("#key-input").value = "";
  $("#key-status").textContent = "Checking…";
  start();
});

$("#forget-key").addEventListener("click", () => {
  setApiKey("");
  location.reload();
});

start();
