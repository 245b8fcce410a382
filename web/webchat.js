// The chat page: one WebSocket (JSON events, subprotocol webchat.v1.json) to
// the server that served this page.  docs/protocol.md describes the events.
//
// Why it is built this way:
// - The room comes from the URL (/r/<room> or /#room, else "lobby"), and the
//   socket URL from the page's own location (wss: under https, same host and
//   port, path /ws/<room>), so the page works behind any host name, port or
//   TLS proxy without editing a hard-coded address.
// - Everything people type is inserted with textContent, never innerHTML: the
//   seed's `innerHTML +=` ran whatever HTML a chatter sent in everyone's
//   browser.  Line breaks are kept by CSS (white-space: pre-wrap), not <br>.
// - A message is never shown as sent when it was not: it stays "sending" until
//   the server's `ack` for its `ref`, and is marked failed with the reason of
//   an `error` for that ref, or when the connection closes before the ack.
// - A lost connection is retried by itself with capped, jittered exponential
//   backoff (0.5 s doubling to 10 s, each wait drawn from [d/2, d]), so a
//   restarted server is not stampeded by every open tab at the same instant;
//   the status line says why it closed (code and reason) meanwhile.
// - Nothing said is lost to a reconnect: the page keeps the room's epoch and
//   the offset up to which it has shown every message, and reconnects with
//   ?since=&epoch= so the server sends exactly what it missed.  Messages are
//   shown once per offset (a replay may repeat what was already shown) and in
//   offset order; "Some messages may be missing" says when the server could
//   not send all of them, and a separator marks a new epoch (the room's
//   history was lost: offsets start again and must not be mixed with the old).
// - With --redis, a message said on our node while Redis is away comes with
//   no offset (ours is acked without one); once Redis is back it is numbered,
//   and a resume brings it again, numbered.  That copy is matched to the one
//   shown (same sender and text; for ours, the one acked without an offset
//   or whose ack was lost), which takes its offset and its place, instead of
//   being shown twice; a message without an offset never moves `since`.
'use strict';

(() => {
  const PROTOCOL = 'webchat.v1.json';
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const DEFAULT_ROOM = 'lobby';
  const ROOM_NAME = /^[A-Za-z0-9._-]{1,64}$/;
  const NAME_KEY = 'webchat.name';
  // Two messages of one sender this close together share one header.
  const GROUP_WINDOW_MS = 5 * 60 * 1000;
  // The server relays at most one typing event per 2 s per member; a typist
  // is shown a little longer than that, so steady typing does not flicker.
  const TYPING_SEND_MS = 2000;
  const TYPING_SHOW_MS = 4000;
  // Shown until the server's welcome says otherwise (the server's default).
  const FALLBACK_MAX_TEXT_BYTES = 65280;

  const STATUS = {
    idle: 'Not connected',
    connecting: 'Connecting…',
    open: 'Connected',
    closed: 'Connection closed',
    error: 'An error occurred',
  };

  const byId = (id) => document.getElementById(id);
  const statusElement = byId('status');
  const roomNameElement = byId('room-name');
  const messageList = byId('messages');
  const memberList = byId('members');
  const memberCount = byId('member-count');
  const form = byId('message-form');
  const input = byId('message-input');
  const sendButton = byId('send-button');
  const limitNote = byId('limit-note');
  const nameForm = byId('name-form');
  const nameInput = byId('name-input');
  const nameNote = byId('name-note');
  const roomForm = byId('room-form');
  const roomInput = byId('room-input');
  const roomNote = byId('room-note');
  const newMessagesButton = byId('new-messages');
  const typingLine = byId('typing');
  const encoder = new TextEncoder();
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });

  let room = roomFromLocation();
  let socket = null;
  let failedAttempts = 0;
  let retryTimer = null;
  let myId = null;
  let maxTextBytes = FALLBACK_MAX_TEXT_BYTES;
  let nextRef = 1;
  let unread = 0;
  // Online members of the room in join order: id -> name.
  const members = new Map();
  // Our messages still waiting for their ack: ref -> list item.
  const pending = new Map();
  // The last error event without a ref: the reason a policy close is about to give.
  let lastError = null;
  // Who is typing: id -> timer that forgets them.
  const typists = new Map();
  let lastTypingSent = 0;
  // A name event sent and not yet answered (by a name event or an error).
  let renaming = false;
  // Where this room's log stands, for resuming after a reconnect: the epoch
  // (null: never welcomed in this room since its log was last cleared), the
  // offset up to which every message has been shown (`since` for the next
  // connect), and each offset shown (or acked as ours) in this epoch.
  const resumePoint = { epoch: null, upTo: 0, shown: new Set() };
  // Whether the current connection asked to resume, and the welcome's offset.
  let resuming = false;
  let joinOffset = 0;
  // Who we have been, "id name" per connection: after a reconnect our own
  // messages come back from history under an earlier id.  The name is part of
  // the key because ids start again at 1 when the server restarts.
  const ourIdentities = new Set();

  // -- the room and the name ---------------------------------------------------

  function roomFromLocation() {
    const path = /^\/r\/([^/]+)\/?$/.exec(window.location.pathname);
    let candidate = path ? path[1] : window.location.hash.replace(/^#/, '');
    try {
      candidate = decodeURIComponent(candidate);
    } catch (error) {
      candidate = '';
    }
    return ROOM_NAME.test(candidate) ? candidate : DEFAULT_ROOM;
  }

  function storedName() {
    try {
      return (window.localStorage.getItem(NAME_KEY) || '').trim();
    } catch (error) {
      return ''; // storage disabled: a guest name every visit
    }
  }

  function storeName(name) {
    try {
      window.localStorage.setItem(NAME_KEY, name);
    } catch (error) {
      // storage disabled: the name lasts as long as the tab
    }
  }

  function showRoom() {
    roomNameElement.textContent = room;
    document.title = titleText();
  }

  function titleText() {
    const base = `#${room} — WebChat`;
    return unread > 0 ? `(${unread}) ${base}` : base;
  }

  // -- the status line ---------------------------------------------------------

  function setStatus(state, text = STATUS[state]) {
    statusElement.textContent = text;
    statusElement.dataset.state = state;
    updateSendButton();
  }

  function isOpen() {
    return socket !== null && socket.readyState === WebSocket.OPEN && myId !== null;
  }

  // -- the message limit -------------------------------------------------------

  function byteLength(text) {
    return encoder.encode(text).length;
  }

  function updateSendButton() {
    const size = byteLength(input.value);
    // 0: the server sets no limit (it runs with --max-message-size 0).
    const tooBig = maxTextBytes > 0 && size > maxTextBytes;
    input.setAttribute('aria-invalid', tooBig ? 'true' : 'false');
    if (tooBig) {
      limitNote.textContent = `Too long: ${size} of at most ${maxTextBytes} bytes`;
    } else if (maxTextBytes > 0 && size > maxTextBytes * 0.9) {
      const left = maxTextBytes - size;
      limitNote.textContent = `${left} ${left === 1 ? 'byte' : 'bytes'} left`;
    } else {
      limitNote.textContent = '';
    }
    sendButton.disabled = !isOpen() || tooBig || input.value.trim() === '';
  }

  // -- the log -------------------------------------------------------------------

  // Only scroll the log if the reader is already at the bottom (or it is our
  // own message), so scrolling back to read is not undone by every new line.
  function isScrolledToBottom() {
    const slack = 24;
    return messageList.scrollHeight - messageList.scrollTop - messageList.clientHeight < slack;
  }

  function scrollToBottom() {
    messageList.scrollTop = messageList.scrollHeight;
    newMessagesButton.hidden = true;
  }

  function addToLog(item, mine, before = null, countUnread = true) {
    const follow = mine || isScrolledToBottom();
    messageList.insertBefore(item, before);
    if (follow) {
      scrollToBottom();
    } else {
      newMessagesButton.hidden = false;
    }
    if (!mine && countUnread && document.hidden) {
      unread += 1;
      document.title = titleText();
    }
  }

  function timeElement(ms) {
    const time = document.createElement('time');
    time.className = 'time';
    const when = new Date(ms);
    time.dateTime = when.toISOString();
    time.textContent = timeFormat.format(when);
    time.title = when.toLocaleString();
    return time;
  }

  // A message right after one of the same sender joins its group: the header
  // is then hidden visually but still read out by screen readers.
  function regroup(item) {
    if (!item || !item.classList.contains('message')) return;
    const previous = item.previousElementSibling;
    const grouped = Boolean(
      previous &&
        previous.classList.contains('message') &&
        !previous.classList.contains('failed') &&
        !item.classList.contains('failed') &&
        previous.dataset.sender === item.dataset.sender &&
        Math.abs(Number(item.dataset.ts) - Number(previous.dataset.ts)) < GROUP_WINDOW_MS,
    );
    item.classList.toggle('grouped', grouped);
  }

  // Where a message with this offset goes: before the later messages of the
  // same epoch at the end of the log (and before our own still being sent),
  // so a replayed or late message takes its place in offset order.  Notices
  // in between stay where they are; a separator or an earlier message ends
  // the search.
  function placeFor(offset) {
    let before = null;
    for (let el = messageList.lastElementChild; el; el = el.previousElementSibling) {
      if (!el.classList.contains('message')) {
        if (el.classList.contains('notice')) continue;
        break; // a separator: another epoch above
      }
      if (el.dataset.offset === undefined) {
        if (el.classList.contains('pending')) {
          before = el; // ours, not yet numbered: it stays last
          continue;
        }
        // Ours never numbered (failed), or one said while Redis was away
        // (numbered later, if a resume brings it): no place in the order yet.
        continue;
      }
      if (el.dataset.epoch !== resumePoint.epoch || Number(el.dataset.offset) < offset) break;
      before = el;
    }
    return before;
  }

  // A message: header (sender, time), text, and for ours a delivery state.
  // `delayed`: held back by a Redis outage, so it may be shown later than
  // messages said after it: a quiet mark in the header says why.
  function appendMessage({ senderId, name, text, ts, mine, offset, delayed = false, countUnread = true }) {
    const item = document.createElement('li');
    item.className = mine ? 'message mine' : 'message';
    if (delayed) item.classList.add('delayed');
    item.dataset.sender = String(senderId);
    item.dataset.ts = String(ts);
    if (offset !== undefined) {
      item.dataset.offset = String(offset);
      item.dataset.epoch = resumePoint.epoch;
    }

    const header = document.createElement('span');
    header.className = 'meta';
    const sender = document.createElement('span');
    sender.className = 'sender';
    sender.textContent = mine ? `${name} (you)` : name;
    header.append(sender, ' ', timeElement(ts));
    if (delayed) {
      const mark = document.createElement('span');
      mark.className = 'delayed-mark';
      mark.textContent = 'delayed';
      mark.title = 'Held back while the server was reconnecting; shown in its place';
      header.append(' ', mark);
    }

    const body = document.createElement('span');
    body.className = 'text';
    body.dir = 'auto';
    body.textContent = text;

    // A grouped message hides its header: its time is still there on hover.
    item.title = new Date(ts).toLocaleString();
    item.append(header, body);
    if (mine) {
      const state = document.createElement('span');
      state.className = 'delivery';
      item.append(state);
    }
    addToLog(item, mine, offset === undefined ? null : placeFor(offset), countUnread);
    regroup(item);
    regroup(item.nextElementSibling);
    return item;
  }

  // Join, leave, rename and connection notices: one quiet line.
  function appendNotice(text, kind = '') {
    const item = document.createElement('li');
    item.className = kind ? `notice ${kind}` : 'notice';
    item.textContent = text;
    addToLog(item, true);
  }

  // The room's history was lost (a new epoch): a line between the two.
  function appendSeparator() {
    const item = document.createElement('li');
    item.className = 'separator';
    item.setAttribute('role', 'separator');
    item.textContent = "The room's history was reset";
    addToLog(item, true);
  }

  // -- offsets and resuming ------------------------------------------------------

  // An offset is shown: remember it, and move `upTo` over every offset now
  // shown without a gap (a late one fills a gap; the next connect asks
  // from the first offset not yet shown).
  function markShown(offset) {
    resumePoint.shown.add(offset);
    while (resumePoint.shown.has(resumePoint.upTo + 1)) {
      resumePoint.upTo += 1;
    }
  }

  function resetResumePoint() {
    resumePoint.epoch = null;
    resumePoint.upTo = 0;
    resumePoint.shown = new Set();
  }

  // The welcome says where the room stands, and whether our resume worked.
  function onResumeState(event) {
    joinOffset = Number.isInteger(event.offset) ? event.offset : 0;
    const epoch = typeof event.epoch === 'string' ? event.epoch : null;
    const asked = resuming;
    const newEpoch = resumePoint.epoch !== null && epoch !== resumePoint.epoch;
    if (resumePoint.epoch === null || newEpoch) {
      // A first join here, or the history we knew is gone: offsets start over.
      resumePoint.epoch = epoch;
      resumePoint.shown = new Set();
      resumePoint.upTo = joinOffset; // the join history is a courtesy, not a promise
      if (newEpoch) appendSeparator();
    }
    if (asked && event.recovered === false) {
      appendNotice('Some messages may be missing', 'missing');
      // Said once: what follows is all the server still has.
      resumePoint.upTo = Math.max(resumePoint.upTo, joinOffset);
    }
  }

  function setDelivery(item, state, text) {
    // A longer label (a failure's reason) must not push the end out of view.
    const follow = isScrolledToBottom();
    item.classList.remove('pending', 'failed');
    if (state) {
      item.classList.add(state);
    }
    const label = item.querySelector('.delivery');
    if (label) {
      label.textContent = text;
    }
    if (follow) {
      scrollToBottom();
    }
  }

  // `unconfirmed`: the connection closed before the ack, so the server may
  // have taken it after all; if it comes back from history, it is shown as
  // sent then (see onMessage).
  function failPending(reason, unconfirmed = false) {
    for (const item of pending.values()) {
      setDelivery(item, 'failed', `Not sent: ${reason}`);
      if (unconfirmed) item.dataset.unconfirmed = 'true';
    }
    pending.clear();
  }

  // -- who is online -------------------------------------------------------------

  function renderMembers() {
    memberList.replaceChildren();
    for (const [id, name] of members) {
      const item = document.createElement('li');
      item.dataset.id = String(id);
      item.textContent = name;
      if (id === myId) {
        item.className = 'me';
        const you = document.createElement('span');
        you.className = 'you';
        you.textContent = ' (you)';
        item.append(you);
      }
      memberList.append(item);
    }
    memberCount.textContent = `(${members.size})`;
  }

  // The name prompt: until a name is chosen (and remembered), the field is
  // empty and asks for one (the online list shows the guest name meanwhile).
  function showOwnName() {
    nameInput.value = storedName() ? nameOf(myId) : '';
  }

  function nameOf(id) {
    return members.get(id) || `guest-${id}`;
  }

  // -- events from the server ------------------------------------------------------

  function onWelcome(event) {
    myId = event.id;
    ourIdentities.add(`${event.id} ${event.name}`);
    renaming = false;
    members.clear();
    for (const member of event.members || []) {
      members.set(member.id, member.name);
    }
    members.set(event.id, event.name);
    if (event.limits && Number.isInteger(event.limits.max_text_bytes)) {
      maxTextBytes = event.limits.max_text_bytes;
    }
    typists.clear();
    showTypists();
    showOwnName();
    renderMembers();
    onResumeState(event);
    failedAttempts = 0;
    lastError = null;
    setStatus('open');
  }

  function showTypists() {
    const names = [...typists.keys()].map(nameOf);
    if (names.length === 0) {
      typingLine.textContent = '';
    } else if (names.length <= 3) {
      typingLine.textContent = `${names.join(', ')} ${names.length === 1 ? 'is' : 'are'} typing…`;
    } else {
      typingLine.textContent = 'Several people are typing…';
    }
  }

  function stopTyping(id) {
    if (typists.has(id)) {
      window.clearTimeout(typists.get(id));
      typists.delete(id);
      showTypists();
    }
  }

  function onTyping(event) {
    stopTyping(event.id);
    typists.set(event.id, window.setTimeout(() => stopTyping(event.id), TYPING_SHOW_MS));
    showTypists();
  }

  // The copy already shown of a numbered message, if there is one: shown
  // without an offset, in this epoch (below the last separator), with the
  // same text, and the earliest such (two alike are two).  Ours: one whose
  // ack came without an offset (said while Redis was away), one still
  // sending, or one marked failed because the connection closed before its
  // ack (the server may have taken it after all).  Someone else's: one of
  // the same sender id (history keeps the id the sender had then).
  function unnumberedCopy(event, mine) {
    let found = null;
    for (let el = messageList.lastElementChild; el; el = el.previousElementSibling) {
      if (el.classList.contains('separator')) break;
      if (!el.classList.contains('message') || el.dataset.offset !== undefined) continue;
      if (el.querySelector('.text').textContent !== event.text) continue;
      const ours = el.classList.contains('mine');
      if (mine) {
        if (!ours || (el.classList.contains('failed') && el.dataset.unconfirmed !== 'true')) continue;
      } else if (ours || el.dataset.sender !== String(event.id)) {
        continue;
      }
      found = el;
    }
    return found;
  }

  // The copy shown becomes the numbered message: its offset, the server's
  // time, and its place in offset order (it is taken out first, so it does
  // not count as its own place).
  function takeOffset(item, offset, ts) {
    const next = item.nextElementSibling;
    if (item.dataset.ref !== undefined && pending.get(item.dataset.ref) === item) {
      pending.delete(item.dataset.ref);
    }
    delete item.dataset.unconfirmed;
    item.remove();
    confirm(item, offset, ts);
    messageList.insertBefore(item, placeFor(offset));
    regroup(item);
    regroup(item.nextElementSibling);
    regroup(next);
  }

  function onMessage(event) {
    if (!event.history) stopTyping(event.id);
    const offset = Number.isInteger(event.offset) ? event.offset : undefined;
    if (offset !== undefined && resumePoint.shown.has(offset)) {
      return; // shown already (a replay after a reconnect repeats some)
    }
    const mine = event.id === myId || ourIdentities.has(`${event.id} ${event.name}`);
    // A numbered copy of one shown without its offset: from a replay (only a
    // replay brings back ours: the server never echoes a live one), or, for
    // someone else's, delayed.  A live, undelayed one is a new message.
    const again = offset !== undefined && (event.history || (event.delayed === true && !mine));
    const copy = again ? unnumberedCopy(event, mine) : null;
    if (copy) {
      takeOffset(copy, offset, event.ts);
      return;
    }
    appendMessage({
      senderId: event.id,
      name: event.name,
      text: event.text,
      ts: event.ts,
      mine,
      offset,
      delayed: event.delayed === true,
      // What was said before we joined is not news; what we missed is.
      countUnread: !(event.history && !resuming && offset <= joinOffset),
    });
    if (offset !== undefined) markShown(offset);
  }

  // Our message has its place in the room: its offset and the server's time.
  function confirm(item, offset, ts) {
    item.dataset.ts = String(ts);
    if (Number.isInteger(offset)) {
      item.dataset.offset = String(offset);
      item.dataset.epoch = resumePoint.epoch;
      markShown(offset);
    }
    const time = item.querySelector('time');
    if (time) time.replaceWith(timeElement(ts));
    setDelivery(item, null, '');
  }

  function onAck(event) {
    const item = pending.get(event.ref);
    if (!item) return;
    pending.delete(event.ref);
    confirm(item, event.offset, event.ts);
  }

  function onError(event) {
    const reason = event.reason || event.code || 'refused';
    if (event.ref !== undefined && event.ref !== null && pending.has(event.ref)) {
      setDelivery(pending.get(event.ref), 'failed', `Not sent: ${reason}`);
      pending.delete(event.ref);
      return;
    }
    if (event.code === 'bad_name' || event.code === 'name_taken') {
      nameNote.textContent = reason;
      if (!renaming) {
        // The remembered name (sent as ?name=) was refused: stop sending it.
        storeName('');
      }
      renaming = false;
      showOwnName();
      return;
    }
    lastError = reason;
    appendNotice(`Server: ${reason}`);
  }

  function onJoin(event) {
    members.set(event.member.id, event.member.name);
    renderMembers();
    appendNotice(`${event.member.name} joined`);
  }

  function onLeave(event) {
    stopTyping(event.member.id);
    members.delete(event.member.id);
    renderMembers();
    appendNotice(`${event.member.name} left`);
  }

  function onName(event) {
    members.set(event.id, event.name);
    renderMembers();
    if (event.id === myId) {
      ourIdentities.add(`${event.id} ${event.name}`);
      renaming = false;
      storeName(event.name);
      showOwnName();
      nameNote.textContent = '';
      appendNotice(`You are now ${event.name}`);
    } else {
      appendNotice(`${event.old} is now ${event.name}`);
    }
  }

  const HANDLERS = {
    welcome: onWelcome,
    message: onMessage,
    ack: onAck,
    error: onError,
    join: onJoin,
    leave: onLeave,
    name: onName,
    typing: onTyping,
  };

  function receive(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch (error) {
      return; // not ours to show: the server only sends JSON on this protocol
    }
    const handler = event && HANDLERS[event.type];
    if (handler) {
      handler(event);
    }
  }

  // -- the connection ----------------------------------------------------------------

  function socketURL() {
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    const params = [];
    const name = storedName();
    if (name) params.push(`name=${encodeURIComponent(name)}`);
    resuming = resumePoint.epoch !== null;
    if (resuming) {
      params.push(`since=${resumePoint.upTo}`, `epoch=${encodeURIComponent(resumePoint.epoch)}`);
    }
    const query = params.length ? `?${params.join('&')}` : '';
    return `${scheme}//${window.location.host}/ws/${encodeURIComponent(room)}${query}`;
  }

  function backoffDelay(attempt) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** attempt);
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  function closeText(code, reason) {
    const why = reason || lastError;
    return why ? `code ${code}: ${why}` : `code ${code}`;
  }

  function scheduleReconnect(why) {
    if (retryTimer !== null) {
      return;
    }
    const delay = backoffDelay(failedAttempts);
    failedAttempts += 1;
    const seconds = Math.max(1, Math.round(delay / 1000));
    setStatus('closed', `${STATUS.closed} (${why}) — reconnecting in ${seconds} s…`);
    retryTimer = window.setTimeout(() => {
      retryTimer = null;
      connect();
    }, delay);
  }

  function connect() {
    let ws;
    myId = null;
    try {
      ws = new WebSocket(socketURL(), PROTOCOL);
    } catch (error) {
      setStatus('error');
      scheduleReconnect('could not connect');
      return;
    }
    socket = ws;
    setStatus('connecting');

    // Handlers check `socket === ws` so a late event from an abandoned
    // socket (a room switch) cannot overwrite the state of the current one.
    ws.addEventListener('message', (event) => {
      if (socket !== ws) return;
      if (typeof event.data === 'string') {
        receive(event.data);
      }
    });
    ws.addEventListener('close', (event) => {
      if (socket !== ws) return;
      socket = null;
      myId = null;
      const why = closeText(event.code, event.reason);
      lastError = null;
      failPending(`the connection closed before the server confirmed it (${why})`, true);
      scheduleReconnect(why);
    });
  }

  function leaveRoom() {
    if (socket !== null) {
      const old = socket;
      socket = null;
      old.close(1000, 'switching rooms');
    }
    if (retryTimer !== null) {
      window.clearTimeout(retryTimer);
      retryTimer = null;
    }
    failPending('you left the room before the server confirmed it');
    members.clear();
    renderMembers();
    for (const id of [...typists.keys()]) stopTyping(id);
    messageList.replaceChildren();
    // The log is empty again: the next join gets the room's history afresh.
    resetResumePoint();
    newMessagesButton.hidden = true;
    failedAttempts = 0;
  }

  function switchRoom(next) {
    if (next === room && socket !== null) {
      return;
    }
    leaveRoom();
    room = next;
    showRoom();
    connect();
  }

  // -- what the person does -------------------------------------------------------------

  function send() {
    const text = input.value;
    if (text.trim() === '' || !isOpen() || sendButton.disabled) {
      return; // keep the draft; Send says why it is disabled
    }
    const ref = `c${nextRef}`;
    nextRef += 1;
    socket.send(JSON.stringify({ type: 'message', text, ref }));
    const item = appendMessage({
      senderId: myId,
      name: nameOf(myId),
      text,
      ts: Date.now(),
      mine: true,
    });
    item.dataset.ref = ref;
    setDelivery(item, 'pending', 'Sending…');
    pending.set(ref, item);
    lastTypingSent = 0; // the message ended the typing others were shown
    input.value = '';
    updateSendButton();
    input.focus();
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    send();
  });

  // Enter sends, Shift+Enter is a new line; Enter that ends an IME
  // composition (Chinese, Japanese, ...) only confirms the composed text.
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  input.addEventListener('input', () => {
    updateSendButton();
    const now = Date.now();
    if (isOpen() && input.value !== '' && now - lastTypingSent >= TYPING_SEND_MS) {
      lastTypingSent = now;
      socket.send(JSON.stringify({ type: 'typing' }));
    }
  });

  nameForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = nameInput.value.trim();
    if (name === '') {
      nameNote.textContent = 'A name needs at least one character';
      return;
    }
    nameNote.textContent = '';
    if (isOpen()) {
      // Remembered once the server takes it (its `name` event).
      if (name === nameOf(myId)) {
        storeName(name);
      } else {
        renaming = true;
        socket.send(JSON.stringify({ type: 'name', name }));
      }
    } else {
      storeName(name); // sent as ?name= on the next connect
    }
    input.focus();
  });

  roomForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const next = roomInput.value.trim();
    if (!ROOM_NAME.test(next)) {
      roomNote.textContent = 'Room names are 1–64 letters, digits, dots, dashes or underscores';
      return;
    }
    roomNote.textContent = '';
    roomInput.value = '';
    // The address says where we are, so it can be bookmarked or shared.
    if (window.location.pathname.startsWith('/r/')) {
      window.history.pushState(null, '', `/r/${next}`);
    } else {
      window.history.pushState(null, '', `#${next}`);
    }
    switchRoom(next);
    input.focus();
  });

  // The back button, or a #room edited by hand.
  window.addEventListener('popstate', () => switchRoom(roomFromLocation()));
  window.addEventListener('hashchange', () => switchRoom(roomFromLocation()));

  // Whether the reader was at the end when the log last scrolled: when the
  // log then shrinks (the composer grows a line, a phone's keyboard opens),
  // the end stays in view instead of sliding under the composer.
  let pinnedToBottom = true;
  messageList.addEventListener('scroll', () => {
    pinnedToBottom = isScrolledToBottom();
    if (pinnedToBottom) {
      newMessagesButton.hidden = true;
    }
  });
  if (window.ResizeObserver) {
    new ResizeObserver(() => {
      if (pinnedToBottom) {
        messageList.scrollTop = messageList.scrollHeight;
      }
    }).observe(messageList);
  }
  newMessagesButton.addEventListener('click', () => {
    scrollToBottom();
    input.focus();
  });

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) {
      unread = 0;
      document.title = titleText();
    }
  });

  // Back online (laptop lid, phone leaving a tunnel): try now, not after the backoff.
  window.addEventListener('online', () => {
    if (retryTimer !== null) {
      window.clearTimeout(retryTimer);
      retryTimer = null;
      connect();
    }
  });

  if (storedName()) {
    nameInput.value = storedName();
  }
  showRoom();
  setStatus('idle');
  connect();
  input.focus();
})();
