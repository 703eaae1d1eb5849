// peersync's test authorization server: oidc-provider (OpenID Certified) configured from a JSON file that the
// test harness writes (tests/authserver.py). Only the client_credentials grant, for SMART Backend Services style
// clients (private_key_jwt with a jwks_uri) and shared-secret clients (client_secret_basic). Access tokens are
// JWTs (RFC 9068, typ at+jwt) signed with the harness's key, for one resource: the FHIR base URL.
//
// Usage: node server.mjs CONFIG.json     (server.sh start does this; it listens on 127.0.0.1 only)
//
// CONFIG: {"issuer": "http://127.0.0.1:PORT", "port": PORT, "resource": "<FHIR base URL>",
//          "signing_key": <private JWK, RS256>,
//          "clients": [{"client_id", "token_endpoint_auth_method": "private_key_jwt" | "client_secret_basic",
//                       "jwks_uri" | "client_secret", "scope": "<scopes this client may be granted>",
//                       "token_ttl_seconds": N}]}
// A requested scope the client may not be granted is left out of the token (and of the response's "scope"),
// as EHR authorization servers do, rather than refused.
//
// Log (stdout): one JSON line per token request, {"event": "grant.success" | "grant.error", "client_id", ...};
// never a token, secret or assertion.
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const clientsById = Object.fromEntries(config.clients.map((c) => [c.client_id, c]));

function log(fields) {
  process.stdout.write(`${JSON.stringify({ time: new Date().toISOString(), ...fields })}\n`);
}

const provider = new Provider(config.issuer, {
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    token_endpoint_auth_method: c.token_endpoint_auth_method,
    ...(c.jwks_uri ? { jwks_uri: c.jwks_uri } : {}),
    ...(c.client_secret ? { client_secret: c.client_secret } : {}),
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  })),
  jwks: { keys: [config.signing_key] },
  // oidc-provider refuses to fetch from special-use addresses (SSRF protection); the test's JWK Set host is on
  // loopback, so for that one address the request goes out without the protecting dispatcher.
  fetch: (url, options) => {
    if (new URL(url).hostname === '127.0.0.1') {
      delete options.dispatcher;
    }
    return globalThis.fetch(url, options);
  },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  routes: { token: '/token', jwks: '/jwks' },
  // Only what peersync signs with (SMART Backend Services: RS384 or ES384), so the tests prove those two.
  enabledJWA: { clientAuthSigningAlgValues: ['RS384', 'ES384'] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: false },
    revocation: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => config.resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator, client) => {
        if (resourceIndicator !== config.resource) {
          throw new errors.InvalidTarget(`the only resource is ${config.resource}`);
        }
        const registered = clientsById[client.clientId];
        return {
          scope: registered.scope,
          audience: config.resource,
          accessTokenTTL: registered.token_ttl_seconds ?? 300,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
});

// Harness only: POST /harness/clients/<client_id>/jwks-stale marks the client's cached JWK Set stale and fetches
// its jwks_uri again now: what the cache's expiry (60 s or max-age) and the next assertion with an unknown kid do
// together (lib/models/client.js, lib/helpers/jwt.js: a stale set is fetched again only when a signature fails).
// The key-rotation test uses it instead of waiting or restarting (a restart also forgets every jti).
provider.use(async (ctx, next) => {
  const match = ctx.method === 'POST' && /^\/harness\/clients\/([^/]+)\/jwks-stale$/.exec(ctx.path);
  if (!match) {
    await next();
    return;
  }
  const client = await provider.Client.find(decodeURIComponent(match[1]));
  if (!client?.jwksUri) {
    ctx.status = 404;
    ctx.body = { error: 'no such client with a jwks_uri' };
    return;
  }
  client.asymmetricKeyStore.freshUntil = 0;
  await client.asymmetricKeyStore.refresh();
  log({ event: 'harness.jwks-refreshed', client_id: client.clientId });
  ctx.status = 204;
});

provider.on('grant.success', (ctx) => {
  log({ event: 'grant.success', client_id: ctx.oidc.client?.clientId, scope: ctx.body?.scope,
    expires_in: ctx.body?.expires_in });
});
// The chain of causes, innermost last (e.g. "client JSON Web Key Set failed to be refreshed: <why>").
function reasons(err) {
  const chain = [];
  for (let e = err.cause; e && chain.length < 5; e = e.cause) {
    chain.push(e.error_description || e.message || String(e));
  }
  return chain.join(': ') || err.error_detail;
}

provider.on('grant.error', (ctx, err) => {
  // The response says only "invalid_client"; the reason (replayed jti, unknown kid, expired) is for the operator.
  log({ event: 'grant.error', client_id: ctx.oidc?.client?.clientId, error: err.error,
    error_description: err.error_description, reason: reasons(err) });
});

provider.listen(config.port, '127.0.0.1', () => {
  log({ event: 'listening', issuer: config.issuer });
});
