// The one script of the status page: appends a running job's events to its timeline as they
// arrive (server-sent events). Without it the page still shows everything up to its load.
(function () {
  "use strict";
  var list = document.getElementById("timeline");
  if (!list || !list.dataset.live || !window.EventSource) {
    return;
  }
  var stateClass = function (state) {
    return String(state).replace(/[^a-z_]/g, "");
  };
  var setState = function (state, message) {
    var badge = document.getElementById("job-state");
    if (badge) {
      badge.textContent = state;
      badge.className = "badge state-" + stateClass(state);
    }
    var text = document.getElementById("job-message");
    if (text) {
      text.textContent = message;
    }
  };
  var source = new EventSource(list.dataset.live);
  source.addEventListener("job", function (e) {
    var event;
    try {
      event = JSON.parse(e.data);
    } catch (err) {
      return;
    }
    // Text only: an event's message is never parsed as markup.
    var item = document.createElement("li");
    item.className = "event state-" + stateClass(event.state);
    item.dataset.seq = e.lastEventId;
    var time = document.createElement("time");
    time.dateTime = event.at;
    time.textContent = event.at_text;
    var badge = document.createElement("span");
    badge.className = "badge state-" + stateClass(event.state);
    badge.textContent = event.state;
    var message = document.createElement("span");
    message.className = "message";
    message.textContent = event.message;
    item.append(time, " ", badge, " ", message);
    list.appendChild(item);
    setState(event.state, event.message);
  });
  // A refusal (the agent stopping, the store unavailable) closes the source for good.
  source.addEventListener("error", function () {
    if (source.readyState !== EventSource.CLOSED) {
      return;
    }
    var marker = document.getElementById("live-marker");
    if (marker) {
      marker.textContent = "not live: reload";
      marker.className = "live ended";
    }
  });
  source.addEventListener("end", function () {
    source.close();
    var marker = document.getElementById("live-marker");
    if (marker) {
      marker.textContent = "ended";
      marker.className = "live ended";
    }
  });
})();
