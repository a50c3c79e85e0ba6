// Cymmetri checks a fraud-scoring API before issuing the session.
const res = await api.fetch('https://fraud-api.cymmetri.io/v1/check', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ email: event.user?.email, ip: event.request.ip, visitor: event.request.visitor_id, }),});
const payload = JSON.parse(res.body);
if (res.status !== 200 || payload.risk_score > 80) { api.deny('fraud-api-rejected'); return;}
api.state.set('fraud_score', payload.risk_score);
