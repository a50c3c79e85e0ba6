#!/usr/bin/env node
// A gateway's client of `actionpool serve`, in Node.js with nothing but the built-in fetch (Node 18+).
//
// It walks the control plane the way a gateway team uses it: onboard a tenant, deploy a Python and a
// JavaScript action, bind them in a flow with a decision block, run logins (one allowed, one denied), see a
// bad deploy refused with its line and column, roll back an action and a flow, and delete the tenant.
// One secret shows the secrets model: written once, listed by name only, received only by the action declaring it.
// Management calls use the admin token; logins use the flow token (the one the gateway's login path holds).
//
//   ACTIONPOOL_URL=http://127.0.0.1:8080 ACTIONPOOL_ADMIN_TOKEN=... ACTIONPOOL_FLOW_TOKEN=... \
//       node examples/gateway-client/client.mjs
//
// Optional: ACTIONPOOL_TENANT (default "example-co"), ACTIONPOOL_TIMEOUT_MS (default 10000).
// Each step prints one line. Exit 0: every answer was the expected one; 1: an unexpected answer (the line
// says which call, what was expected and what came back); 2: the configuration is incomplete.

const TRIGGER = 'post-login';

// ------------------------------------------------------------------ configuration

/** The client's only global state: read once from the environment, never changed. */
function readConfig(env) {
  const missing = ['ACTIONPOOL_URL', 'ACTIONPOOL_ADMIN_TOKEN', 'ACTIONPOOL_FLOW_TOKEN'].filter((k) => !env[k]);
  if (missing.length) {
    throw new ConfigError(`set ${missing.join(', ')} (the sidecar's base URL, its admin token and its flow token)`);
  }
  const timeoutMs = Number(env.ACTIONPOOL_TIMEOUT_MS ?? 10000);
  if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) {
    throw new ConfigError(`ACTIONPOOL_TIMEOUT_MS must be a positive number of milliseconds, got ${env.ACTIONPOOL_TIMEOUT_MS}`);
  }
  return Object.freeze({
    url: env.ACTIONPOOL_URL.replace(/\/+$/, ''),
    adminToken: env.ACTIONPOOL_ADMIN_TOKEN,
    flowToken: env.ACTIONPOOL_FLOW_TOKEN,
    tenant: env.ACTIONPOOL_TENANT || 'example-co',
    author: 'gateway-client',
    timeoutMs,
  });
}

class ConfigError extends Error {}

/** An answer the client did not expect: the call, the statuses it accepts, and what came back. */
class UnexpectedAnswer extends Error {
  constructor(method, path, expected, status, body, retryAfterS = null) {
    const shown = typeof body === 'string' ? body : JSON.stringify(body);
    super(`${method} ${path}: expected ${expected.join(' or ')}, got ${status}: ${shown.slice(0, 500)}`);
    this.status = status;
    this.body = body;
    this.retryAfterS = retryAfterS;
  }
}

// ------------------------------------------------------------------ one HTTP call

/**
 * One request to the sidecar. `token` is "admin" or "flow"; `expect` lists the statuses that are an answer
 * rather than an error. JSON bodies in and out; any other status throws UnexpectedAnswer.
 */
async function call(config, { method, path, token, body, headers = {}, expect }) {
  const init = {
    method,
    headers: {
      Authorization: `Bearer ${token === 'admin' ? config.adminToken : config.flowToken}`,
      Accept: 'application/json',
      ...headers,
    },
    signal: AbortSignal.timeout(config.timeoutMs),
  };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(config.url + path, init);
  } catch (err) {
    throw new Error(`${method} ${path}: no answer from ${config.url}: ${err.cause?.message ?? err.message}`);
  }
  const text = await res.text();
  const isJson = (res.headers.get('content-type') ?? '').includes('json') && text !== '';
  let data = text;
  if (isJson) {
    try {
      data = JSON.parse(text);
    } catch (err) {
      throw new Error(`${method} ${path}: ${res.status} with a body that is not JSON: ${err.message}`);
    }
  }
  if (!expect.includes(res.status)) {
    const retryAfter = Number(res.headers.get('retry-after'));
    throw new UnexpectedAnswer(method, path, expect, res.status, data, Number.isFinite(retryAfter) ? retryAfter : null);
  }
  return { status: res.status, data };
}

const seg = encodeURIComponent;
const tenantPath = (config) => `/v1/tenants/${seg(config.tenant)}`;
const authored = (config) => ({ 'X-Actionpool-Author': config.author });

// ------------------------------------------------------------------ the management API (admin token)

/** PUT the tenant's settings: 201 when it is new, 200 when it existed (the whole settings object is replaced). */
async function putTenant(config, settings) {
  const { status, data } = await call(config, {
    method: 'PUT', path: tenantPath(config), token: 'admin', body: settings, headers: authored(config), expect: [200, 201],
  });
  return { created: status === 201, settings: data };
}

/** Deploy one version of an action; answers {slug, version}. A source the engine rejects throws (422). */
async function deployAction(config, slug, { source, language, message, secrets = [], failure }) {
  const body = { source, language, message, secrets };
  if (failure) body.failure = failure;
  const { data } = await call(config, {
    method: 'PUT', path: `${tenantPath(config)}/actions/${seg(slug)}`, token: 'admin', body, headers: authored(config), expect: [201],
  });
  return data;
}

/** Deploy a version expected to be refused: returns the 422's {error, line, column}. */
async function deployRejected(config, slug, version) {
  try {
    await deployAction(config, slug, version);
  } catch (err) {
    if (err instanceof UnexpectedAnswer && err.status === 422) return err.body;
    throw err;
  }
  throw new Error(`PUT actions/${slug}: a source with a syntax error was accepted (expected 422)`);
}

async function describeAction(config, slug) {
  const { data } = await call(config, { method: 'GET', path: `${tenantPath(config)}/actions/${seg(slug)}`, token: 'admin', expect: [200] });
  return data;
}

/** Back to `version` (one of the kept versions), or to the previous one when it is not given. */
async function rollbackAction(config, slug, version) {
  const { data } = await call(config, {
    method: 'POST', path: `${tenantPath(config)}/actions/${seg(slug)}/rollback`, token: 'admin',
    body: version ? { version } : {}, headers: authored(config), expect: [200],
  });
  return data;
}

/** Bind the trigger's flow: an ordered list of slugs and decision blocks. Answers {version}. */
async function putFlow(config, trigger, entries) {
  const { data } = await call(config, {
    method: 'PUT', path: `${tenantPath(config)}/flows/${seg(trigger)}`, token: 'admin', body: entries, headers: authored(config), expect: [200],
  });
  return data;
}

async function getFlow(config, trigger) {
  const { data } = await call(config, { method: 'GET', path: `${tenantPath(config)}/flows/${seg(trigger)}`, token: 'admin', expect: [200] });
  return data;
}

async function rollbackFlow(config, trigger, version) {
  const { data } = await call(config, {
    method: 'POST', path: `${tenantPath(config)}/flows/${seg(trigger)}/rollback`, token: 'admin',
    body: version ? { version } : {}, headers: authored(config), expect: [200],
  });
  return data;
}

/** Set a secret (write-only: 204, no value comes back). Only actions that declare its name receive it. */
async function putSecret(config, name, value) {
  await call(config, {
    method: 'PUT', path: `${tenantPath(config)}/secrets/${seg(name)}`, token: 'admin', body: { value }, headers: authored(config), expect: [204],
  });
}

/** The tenant's secrets: [{name, updated_at}], never a value. */
async function listSecrets(config) {
  const { data } = await call(config, { method: 'GET', path: `${tenantPath(config)}/secrets`, token: 'admin', expect: [200] });
  return data;
}

async function deleteTenant(config) {
  await call(config, { method: 'DELETE', path: tenantPath(config), token: 'admin', headers: authored(config), expect: [204] });
}

// ------------------------------------------------------------------ the login path (flow token)

/**
 * Run the tenant's flow for one login: 200 for allow and deny alike. The Idempotency-Key is the gateway's login
 * attempt: a 503 (overloaded or draining, with Retry-After) is retried once with the same key (behind a load
 * balancer, on another replica), so the actions see the same event.execution_id and can keep side effects
 * idempotent. Anything else that is not an answer throws: a gateway must treat that as a deny, never an allow.
 */
async function runFlow(config, trigger, event, attemptId = crypto.randomUUID(), { expect = [200] } = {}) {
  const request = {
    method: 'POST', path: `${tenantPath(config)}/flows/${seg(trigger)}`, token: 'flow', body: event,
    headers: { 'Idempotency-Key': attemptId }, expect,
  };
  for (let attempt = 1; ; attempt += 1) {
    try {
      const { status, data } = await call(config, request);
      return status === 200 ? data : { status, ...data };
    } catch (err) {
      if (!(err instanceof UnexpectedAnswer) || err.status !== 503 || attempt >= 2) throw err;
      await new Promise((resolve) => setTimeout(resolve, Math.min(err.retryAfterS ?? 1, 5) * 1000));
    }
  }
}

// ------------------------------------------------------------------ the actions this example deploys

// The blocked countries come from a secret the action declares (so no other action of the tenant sees it).
const CHECK_COUNTRY_PY = `\
def on_execute_post_login(event, api):
    blocked = (event.secrets.BLOCKED_COUNTRIES or "").split(",")
    api.state.set("country_blocked", event.request.geo.country in blocked)
`;

const TAG_TIER_JS = (tierOf) => `\
exports.onExecutePostLogin = async (event, api) => {
  const domain = (event.user.email || '').split('@').pop();
  api.accessToken.setCustomClaim('tier', ${tierOf});
};
`;

const BROKEN_PY = `\
def on_execute_post_login(event, api)
    api.state.set("country_blocked", False)
`;

const login = (email, country) => ({
  user: { user_id: `auth0|${email}`, email },
  request: { ip: '198.51.100.23', geo: { country } },
});

// ------------------------------------------------------------------ the walk-through

function expectEqual(what, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    throw new Error(`${what}: expected ${JSON.stringify(want)}, got ${JSON.stringify(got)}`);
  }
}

async function main(config, print) {
  const t = config.tenant;

  const tenant = await putTenant(config, { denial_message: 'Sign-in is not available from your country.', allow_hosts: [] });
  print(`tenant ${t}: ${tenant.created ? 'created (201)' : 'updated (200)'}`);

  const blocked = 'XX,YY,ZZ,QQ';
  await putSecret(config, 'BLOCKED_COUNTRIES', blocked);
  const secrets = await listSecrets(config);
  if (!secrets.some((s) => s.name === 'BLOCKED_COUNTRIES') || JSON.stringify(secrets).includes(blocked)) {
    throw new Error(`GET secrets: expected the name BLOCKED_COUNTRIES and no value, got ${JSON.stringify(secrets)}`);
  }
  print('secret BLOCKED_COUNTRIES: set (204), listed by name only');

  const country = await deployAction(config, 'check-country', {
    source: CHECK_COUNTRY_PY, language: 'python', secrets: ['BLOCKED_COUNTRIES'], message: 'countries from a secret',
  });
  print(`action check-country: deployed python version ${country.version} (201)`);

  const tierV1 = await deployAction(config, 'tag-tier', {
    source: TAG_TIER_JS(`domain === 'cymmetri.io' ? 'enterprise' : 'free'`), language: 'javascript', message: 'tier from the e-mail domain',
  });
  print(`action tag-tier: deployed javascript version ${tierV1.version} (201)`);

  const flowV1 = await putFlow(config, TRIGGER, [
    'check-country',
    { if: 'step.check-country.country_blocked == true', deny: 'country-blocked' },
    'tag-tier',
  ]);
  print(`flow ${TRIGGER}: bound check-country, a deny block and tag-tier as version ${flowV1.version} (200)`);

  const allowed = await runFlow(config, TRIGGER, login('ada@cymmetri.io', 'IN'));
  expectEqual('the allowed login', [allowed.outcome, allowed.claims?.access_token?.tier], ['allow', 'enterprise']);
  print(`run ${TRIGGER} from IN: allow, claim tier=${allowed.claims.access_token.tier}`);

  const denied = await runFlow(config, TRIGGER, login('eve@cymmetri.io', 'XX'));
  expectEqual('the denied login', [denied.outcome, denied.denial?.reason], ['deny', 'country-blocked']);
  print(`run ${TRIGGER} from XX: deny, reason ${denied.denial.reason}, user message "${denied.denial.user_message}"`);

  const refusal = await deployRejected(config, 'check-country', {
    source: BROKEN_PY, language: 'python', secrets: ['BLOCKED_COUNTRIES'], message: 'a missing colon',
  });
  const live = await describeAction(config, 'check-country');
  expectEqual('check-country after the refused deploy', live.current, country.version);
  print(`action check-country: bad version refused (422) at line ${refusal.line}, column ${refusal.column}: ${refusal.error}; still ${live.current}`);

  const tierV2 = await deployAction(config, 'tag-tier', {
    source: TAG_TIER_JS(`'gold'`), language: 'javascript', message: 'everyone is gold',
  });
  const gold = await runFlow(config, TRIGGER, login('ada@cymmetri.io', 'IN'));
  expectEqual('the tier after the second deploy', gold.claims?.access_token?.tier, 'gold');
  const back = await rollbackAction(config, 'tag-tier', tierV1.version);
  expectEqual('tag-tier after its rollback', back.version, tierV1.version);
  print(`action tag-tier: deployed ${tierV2.version}, rolled back to ${back.version} (200)`);

  const flowV2 = await putFlow(config, TRIGGER, ['tag-tier', 'check-country']);
  const flowBack = await rollbackFlow(config, TRIGGER);
  const current = await getFlow(config, TRIGGER);
  expectEqual('the flow after its rollback', [flowBack.version, current.version], [flowV1.version, flowV1.version]);
  const againDenied = await runFlow(config, TRIGGER, login('eve@cymmetri.io', 'XX'));
  expectEqual('a login from XX after the flow rollback', againDenied.outcome, 'deny');
  print(`flow ${TRIGGER}: replaced by ${flowV2.version}, rolled back to ${flowBack.version} (200); XX is denied again`);

  await deleteTenant(config);
  const gone = await runFlow(config, TRIGGER, login('ada@cymmetri.io', 'IN'), undefined, { expect: [404] });
  print(`tenant ${t}: deleted (204); its flows answer ${gone.status}`);
}

try {
  const config = readConfig(process.env);
  await main(config, (line) => console.log(line));
  console.log('done');
} catch (err) {
  console.error(`gateway-client: ${err instanceof ConfigError ? 'configuration' : 'failed'}: ${err.message}`);
  process.exitCode = err instanceof ConfigError ? 2 : 1;
}
