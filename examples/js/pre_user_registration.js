/**
 * An Auth0-style module for the pre-user-registration trigger.
 *
 *   actionpool run examples/js/pre_user_registration.js --trigger pre-user-registration \
 *       --event examples/js/registration.event.json
 *
 * - a blocked e-mail domain      -> api.access.deny(reason, userMessage)
 * - a malformed phone number     -> api.validation.error(errorCode, errorMessage)
 * - too many sign-ups from an IP -> api.access.deny, counted in api.cache
 * - otherwise: record where the sign-up came from and assign a stable user id.
 */
const BLOCKED_DOMAINS = ['competitor.example', 'spam.example'];
const E164 = /^\+[1-9][0-9]{6,14}$/;
const WINDOW_MS = 60 * 60 * 1000;

function stableId(email) {
  // FNV-1a, 32 bits: the same e-mail always gets the same id (a retried sign-up is not a new user).
  let h = 0x811c9dc5;
  for (let i = 0; i < email.length; i++) {
    h ^= email.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return 'cym|' + h.toString(16).padStart(8, '0');
}

exports.onExecutePreUserRegistration = async (event, api) => {
  const email = (event.user?.email ?? '').trim().toLowerCase();
  const domain = email.split('@')[1] ?? '';
  if (BLOCKED_DOMAINS.includes(domain)) {
    api.access.deny(`blocked-domain:${domain}`, 'Sign-ups from this e-mail domain are not accepted.');
    return;
  }

  const phone = event.user?.phone_number;
  if (phone != null && !E164.test(phone)) {
    api.validation.error('invalid_phone_number', 'Enter the phone number in international format, e.g. +919812345678.');
    return;
  }

  const limit = Number(event.secrets?.MAX_SIGNUPS_PER_HOUR ?? '5');
  const key = `signups:${event.request?.ip ?? 'unknown'}`;
  const record = api.cache.get(key);
  const count = record ? Number(record.value) : 0;
  if (count >= limit) {
    console.warn(`sign-up rate limit reached (${count}/${limit} this hour)`);
    api.access.deny('signup-rate-limit', 'Too many sign-ups from your network. Try again later.');
    return;
  }
  const result = api.cache.set(key, String(count + 1), record ? { expires_at: record.expires_at } : { ttl: WINDOW_MS });
  if (result.type !== 'success') console.warn(`cache write failed: ${result.code}`);

  api.user.setUserMetadata('signup_source', event.request?.query?.utm_source ?? 'direct'); // (key, value) form
  api.user.setUserMetadata({ locale: event.request?.language ?? 'en' });                 // (patch) form
  api.user.setUserId(stableId(email));
  api.state.set('signups_this_hour', count + 1);
};
