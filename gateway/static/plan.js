// The tenant's plan page. It is loaded in the tenant's browser session, behind the front
// layer that sets who the user is (key or tenant id, user, role) on every request of that
// session; so the page's own requests send the session's cookies (credentials:
// "same-origin") and the gateway sees the same identity the page was loaded with.
// Everything is built with textContent: no data from the API is ever parsed as HTML.
"use strict";

(function () {
  const APP_TITLES = {
    operations: "Operations",
    client_portal: "Client Portal",
    driver_app: "Driver App",
  };
  // {prefix}/ui → {prefix}; works under any prefix, also one a front layer adds.
  const PREFIX = location.pathname.replace(/\/ui\/?$/, "");
  const params = new URLSearchParams(location.search);
  const FROM = params.get("from");
  const FOCUS_FEATURE = params.get("feature");

  const $ = (id) => document.getElementById(id);
  let plan = null;
  let opener = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "long", timeZone: "UTC" });
  function formatDate(iso) {
    return iso ? dateFormat.format(new Date(iso)) : "";
  }

  function tierTitle(name) {
    // Tier titles the body gives: the current tier, and the tags of locked features.
    if (plan.tier.name === name) return plan.tier.title;
    const feature = plan.features.find((f) => f.required_tier === name && f.tag);
    return feature ? feature.tag : name;
  }

  function addonByName(name) {
    return plan.available_addons.find((a) => a.name === name) || null;
  }

  // ---------------------------------------------------------------- loading

  async function load() {
    let response;
    try {
      response = await fetch(PREFIX, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
    } catch (err) {
      return showLoadError("The plan could not be loaded: the gateway did not answer.");
    }
    if (!response.ok) {
      let detail = "";
      try {
        const problem = await response.json();
        detail = problem.detail || problem.title || "";
      } catch (err) {
        detail = "";
      }
      return showLoadError(`The plan could not be loaded (${response.status}). ${detail}`);
    }
    plan = await response.json();
    render();
  }

  function showLoadError(text) {
    $("loading").hidden = true;
    const box = $("load-error");
    box.textContent = text;
    box.hidden = false;
  }

  // ---------------------------------------------------------------- rendering

  function render() {
    $("loading").hidden = true;
    const badge = $("plan-badge");
    badge.textContent = plan.tier.title;
    badge.setAttribute("aria-label", `Plan: ${plan.tier.title}`);
    badge.hidden = false;
    const tenantLine = $("tenant-line");
    tenantLine.textContent = `Account ${plan.tenant}`;
    tenantLine.hidden = false;
    document.title = `Your plan: ${plan.tier.title}`;
    renderBanners();
    renderSummary();
    renderFeatures();
    renderAddons();
    renderBlocked();
  }

  function renderBanners() {
    const lic = plan.license;
    const box = $("banners");
    box.replaceChildren();
    const expires = formatDate(lic.expires_at);
    const add = (cls, text) => box.append(el("p", { class: `banner ${cls}`, text }));
    if (lic.trial) add("banner-info", `You are on a trial of ${plan.tier.title}. It ends on ${expires}.`);
    if (lic.state === "grace") {
      add("", `Your license expired on ${expires}. Your features stay on for a short grace period: renew to keep them.`);
    } else if (lic.state === "maintained") {
      add("", `Your license expired on ${expires}. Your features stay on for now: please renew.`);
    } else if (lic.state === "restricted") {
      add("banner-error", `Your license expired on ${expires}. Your account is limited to the ${plan.tier.title} plan until you renew.`);
    } else if (lic.state === "grandfathered" && lic.grandfather_until) {
      add("banner-info", `You keep the ${plan.tier.title} plan until ${formatDate(lic.grandfather_until)}.`);
    }
  }

  function renderSummary() {
    const lic = plan.license;
    const lapsed = ["grace", "maintained", "restricted"].includes(lic.state);
    $("renewal-label").textContent = lic.trial ? "Trial ends" : lapsed ? "Expired" : "Renews or expires";
    $("renewal").textContent = formatDate(lic.expires_at);
    const years = plan.terms.retention_years;
    $("retention").textContent = years === "unlimited" ? "Unlimited" : `${years} years`;
    $("support").textContent = plan.terms.support === "none" ? "None included" : plan.terms.support;
    $("held-addons").textContent = plan.addons.length ? plan.addons.map((a) => a.title).join(", ") : "None";
    const seats = $("seats");
    seats.replaceChildren();
    const labels = { ops_users: "Operations users", drivers: "Drivers" };
    for (const [key, label] of Object.entries(labels)) {
      const seat = plan.seats[key];
      const id = `seat-${key}`;
      const over = seat.used > seat.included;
      seats.append(
        el(
          "div",
          { class: over ? "seat over" : "seat" },
          el("label", { for: id, text: `${label}: ${seat.used} of ${seat.included} used${over ? " (over the plan)" : ""}` }),
          // Up to "included" is the good region; past it the meter shows the overage.
          el("meter", {
            id,
            min: "0",
            max: String(Math.max(seat.included, seat.used, 1)),
            low: String(seat.included),
            high: String(seat.included),
            optimum: "0",
            value: String(seat.used),
          }),
        ),
      );
    }
    $("summary").hidden = false;
  }

  function featureTarget(feature) {
    if (feature.required_tier) return `tier:${feature.required_tier}`;
    if (feature.addon) return `addon:${feature.addon}`;
    return null;
  }

  // The upsell controls of one locked feature: purchase buttons for owners and admins,
  // an "ask your admin" nudge for everyone else; nothing when no upsell fields came.
  function upsellControls(feature, nameId) {
    const target = featureTarget(feature);
    if (!target) return null;
    const box = el("div", { class: "actions" });
    if (plan.can_transact) {
      if (feature.required_tier) {
        box.append(upgradeButton(`Upgrade to ${feature.tag || tierTitle(feature.required_tier)}`, feature, `tier:${feature.required_tier}`, nameId, "button"));
      }
      const addon = feature.addon && addonByName(feature.addon);
      if (addon) {
        box.append(upgradeButton(`Add ${addon.title} (${addon.price})`, feature, `addon:${addon.name}`, nameId, feature.required_tier ? "button-secondary" : "button"));
      }
    } else {
      box.append(nudge(feature, target, nameId));
    }
    return box;
  }

  function upgradeButton(label, feature, target, describedBy, cls) {
    const button = el("button", { type: "button", class: cls, text: label, "data-target": target, "data-feature": feature.name });
    if (describedBy) button.setAttribute("aria-describedby", describedBy);
    button.addEventListener("click", () => upgradeClicked(button, feature, target));
    return button;
  }

  function nudge(feature, target, nameId) {
    const where = feature.tag ? `the ${feature.tag} plan` : "a higher plan";
    const tipId = `tip-${feature.name}-${target}`.replace(/[^A-Za-z0-9_-]/g, "-");
    const wrapper = el("span", { class: "nudge" });
    const button = el("button", {
      type: "button",
      class: "nudge-button",
      text: "Ask your admin",
      "aria-describedby": `${nameId} ${tipId}`,
      "data-target": target,
      "data-feature": feature.name,
    });
    const tip = el("span", { id: tipId, role: "tooltip", class: "tooltip", text: `Included in ${where}. Only owners and admins can change the plan.` });
    button.addEventListener("click", () => askAdmin(button, feature, target));
    button.addEventListener("keydown", (event) => {
      if (event.key === "Escape") wrapper.classList.add("dismissed");
    });
    button.addEventListener("blur", () => wrapper.classList.remove("dismissed"));
    wrapper.append(button, tip);
    return wrapper;
  }

  function renderFeatures() {
    const groups = $("feature-groups");
    groups.replaceChildren();
    for (const [app, title] of Object.entries(APP_TITLES)) {
      const shown = plan.features.filter((f) => f.app === app && f.state !== "hidden");
      if (!shown.length) continue;
      const headingId = `app-${app}`;
      const list = el("ul", { "aria-labelledby": headingId });
      for (const feature of shown) list.append(featureRow(feature));
      groups.append(el("section", { class: "app-group", "aria-labelledby": headingId }, el("h3", { id: headingId, text: title }), list));
    }
    $("features").hidden = false;
  }

  function featureRow(feature) {
    const nameId = `name-${feature.name}`;
    const row = el("li", { class: `feature ${feature.state}`, id: `feature-${feature.name}`, "data-state": feature.state });
    row.append(el("span", { class: "name", id: nameId, text: feature.title }));
    if (feature.state === "enabled") {
      row.append(el("span", { class: "chip chip-enabled", text: "Included" }));
    } else {
      const chip = el("span", { class: "chip chip-locked" }, el("span", { class: "sr-only", text: "Requires " }), feature.tag || "Upgrade");
      row.append(chip, upsellControls(feature, nameId));
    }
    if (feature.name === FOCUS_FEATURE) {
      row.classList.add("highlight");
      row.setAttribute("aria-current", "true");
    }
    return row;
  }

  function renderAddons() {
    const cards = $("addon-cards");
    cards.replaceChildren();
    if (!plan.available_addons.length) return;
    $("addons-title").textContent = plan.can_transact ? "Add-ons you can buy" : "Add-ons for your plan";
    for (const addon of plan.available_addons) {
      const titleId = `addon-${addon.name}`;
      const unlocks = addon.unlocks.map((name) => {
        const feature = plan.features.find((f) => f.name === name);
        // An add-on can span apps, where features share titles: say which app.
        return el("li", { text: feature ? `${APP_TITLES[feature.app]}: ${feature.title}` : name });
      });
      // The feature the click is about: the blocked one if this add-on unlocks it.
      const about = addon.unlocks.includes(FOCUS_FEATURE) ? FOCUS_FEATURE : addon.unlocks[0];
      const feature = plan.features.find((f) => f.name === about) || { name: about, title: about };
      const target = `addon:${addon.name}`;
      const action = plan.can_transact
        ? upgradeButton(`Add ${addon.title}`, feature, target, titleId, "button")
        : nudge({ name: about, tag: null }, target, titleId);
      cards.append(
        el(
          "article",
          { class: "card", "aria-labelledby": titleId },
          el("h3", { id: titleId, text: addon.title }),
          el("p", { class: "price", text: addon.price }),
          el("p", { class: "muted", text: "Unlocks:" }),
          el("ul", {}, ...unlocks),
          el("div", { class: "actions" }, action),
        ),
      );
    }
    $("addons").hidden = false;
  }

  // A ?feature= link from a 403: say what was blocked and what would unlock it, even for
  // a feature this app hides (the user met it already).
  function renderBlocked() {
    if (!FOCUS_FEATURE) return;
    const feature = plan.features.find((f) => f.name === FOCUS_FEATURE);
    if (!feature) return;
    const box = $("blocked");
    if (feature.state === "enabled") {
      $("blocked-title").textContent = `${feature.title} is in your plan`;
      $("blocked-text").textContent = "You can use it now.";
    } else if (featureTarget(feature)) {
      $("blocked-title").textContent = `${feature.title} is not in your ${plan.tier.title} plan`;
      const where = feature.tag ? `It is included in ${feature.tag}` : "It is available as an add-on";
      $("blocked-text").textContent = plan.can_transact ? `${where}.` : `${where}. Ask an owner or admin of your account to upgrade.`;
      $("blocked-actions").replaceChildren(upsellControls(feature, "blocked-title"));
    } else {
      return; // no upsell for this role: nothing to say
    }
    box.hidden = false;
    const row = $(`feature-${feature.name}`);
    if (row) row.scrollIntoView({ block: "center" });
  }

  // ---------------------------------------------------------------- clicks

  async function sendClick(feature, target) {
    const body = { event: "upgrade_click", feature: feature.name, target };
    if (FROM) body.source_request_id = FROM;
    try {
      const response = await fetch(`${PREFIX}/events`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.status === 429) {
        const wait = response.headers.get("Retry-After") || "a few";
        return `Too many requests: try again in ${wait} seconds.`;
      }
      return response.ok ? "" : `Your request could not be recorded (${response.status}).`;
    } catch (err) {
      return "Your request could not be recorded: the gateway did not answer.";
    }
  }

  function unlockedBy(target) {
    const [kind, name] = target.split(":");
    if (kind === "addon") {
      const addon = addonByName(name);
      return addon ? addon.unlocks.map((f) => (plan.features.find((x) => x.name === f) || { title: f }).title) : [];
    }
    return plan.features.filter((f) => f.required_tier === name).map((f) => f.title);
  }

  function targetTitle(target) {
    const [kind, name] = target.split(":");
    if (kind === "addon") {
      const addon = addonByName(name);
      return addon ? `the ${addon.title} add-on (${addon.price})` : `the ${name} add-on`;
    }
    return `the ${tierTitle(name)} plan`;
  }

  async function upgradeClicked(button, feature, target) {
    const what = targetTitle(target);
    const title = target.startsWith("addon:") ? `Add ${what}` : `Upgrade to ${what}`;
    openModal(button, title, `${what[0].toUpperCase()}${what.slice(1)} adds:`, unlockedBy(target));
    const problem = await sendClick(feature, target);
    $("modal-status").textContent = problem || "We have noted your request. Your account manager completes the upgrade with you.";
  }

  async function askAdmin(button, feature, target) {
    openModal(
      button,
      "Ask your admin",
      `${feature.title || "This feature"} is included in ${targetTitle(target)}. Only an owner or admin of your account can change the plan: ask them to upgrade.`,
      [],
    );
    const problem = await sendClick(feature, target);
    $("modal-status").textContent = problem || "";
  }

  // ---------------------------------------------------------------- the modal

  function openModal(from, title, text, items) {
    opener = from;
    $("modal-title").textContent = title;
    $("modal-text").textContent = text;
    $("modal-list").replaceChildren(...items.map((item) => el("li", { text: item })));
    $("modal-list").hidden = items.length === 0;
    $("modal-status").textContent = "";
    $("modal-backdrop").hidden = false;
    $("main").setAttribute("inert", "");
    $("modal-ok").focus();
  }

  function closeModal() {
    if ($("modal-backdrop").hidden) return;
    $("modal-backdrop").hidden = true;
    $("main").removeAttribute("inert");
    if (opener) opener.focus();
    opener = null;
  }

  function focusables() {
    return Array.from($("modal").querySelectorAll("button, [href], input, select, textarea, [tabindex]:not([tabindex='-1'])")).filter((node) => !node.disabled && !node.hidden);
  }

  document.addEventListener("keydown", (event) => {
    if ($("modal-backdrop").hidden) return;
    if (event.key === "Escape") {
      event.preventDefault();
      closeModal();
    } else if (event.key === "Tab") {
      // Keep focus inside the dialog: wrap around at both ends.
      const nodes = focusables();
      const first = nodes[0];
      const last = nodes[nodes.length - 1];
      if (event.shiftKey && (document.activeElement === first || !$("modal").contains(document.activeElement))) {
        event.preventDefault();
        last.focus();
      } else if (!event.shiftKey && (document.activeElement === last || !$("modal").contains(document.activeElement))) {
        event.preventDefault();
        first.focus();
      }
    }
  });

  document.addEventListener("DOMContentLoaded", () => {
    $("modal-x").addEventListener("click", closeModal);
    $("modal-ok").addEventListener("click", closeModal);
    $("modal-backdrop").addEventListener("click", (event) => {
      if (event.target === $("modal-backdrop")) closeModal();
    });
    load();
  });
})();
